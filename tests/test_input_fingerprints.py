"""Fingerprints cover the content of the files a user supplies: a dataset file, corpus files and a local model
folder (``init_from``) edited in place make their stage stale, and ``status`` names the file; a file touched
without a change does not; content hashes are cached by (path, size, mtime) and not read again.

Stages here run in-process through the real harness (``run_stage``) around a body that takes milliseconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.config import fingerprint, load_config
from pipeline.lineage import all_fingerprints, hash_cache_path, input_contents, stage_inputs, stage_sections
from pipeline.provenance import ContentHashes
from pipeline.runs import StageDir
from pipeline.stage import StageContext, StageResult, run_stage
from pipeline.status import run_status, stage_status


@pytest.fixture(autouse=True)
def _launch_env(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")  # run_stage sets it: restored afterwards


def _body(ctx: StageContext) -> StageResult:
    ctx.dir.artifact.mkdir(parents=True, exist_ok=True)
    (ctx.dir.artifact / "weights.txt").write_text(ctx.fingerprint)
    return StageResult(metrics={})


def _model_folder(path: Path, weights: bytes = b"w1") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(weights)
    (path / "config.json").write_text('{"n_layer": 1}')
    return path


@pytest.fixture
def sft_run(tmp_path: Path) -> tuple[list[str], Path, Path]:
    """An SFT stage done from a local model folder on a local dataset file: (overrides, dataset, model folder)."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n')
    model = _model_folder(tmp_path / "model")
    overrides = [f"run.root={tmp_path / 'runs'}", f"sft.init_from={model}", f"sft.dataset.source={data}"]
    assert run_stage("sft", overrides, _body) == 0
    assert stage_status(load_config(None, overrides), "sft").state == "done"
    return overrides, data, model


def _edit_keeping_size(path: Path, old: bytes, new: bytes) -> None:
    """An edit in place that keeps the size (the mtime moves on, as with any write)."""
    assert len(old) == len(new)
    st = path.stat()
    path.write_bytes(path.read_bytes().replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # coarse file systems: make the move visible


def test_a_run_on_default_data_and_hub_names_keeps_its_config_only_fingerprints():
    for overrides in ([], ["sft.init_from=gpt2", "reward.dataset.source=hub:x/y", "ppo.policy_from=gpt2"]):
        cfg = load_config(None, overrides)
        fps: dict[str, str] = {}
        for stage in fps.keys() | {"tokenizer", "pretrain", "sft", "reward", "ppo", "export"}:
            assert input_contents(cfg, stage) == {}
        for stage in ("tokenizer", "pretrain", "sft", "reward", "ppo", "export"):  # the formula before contents
            fps[stage] = fingerprint(*stage_sections(cfg, stage), *[fps[u] for u in stage_inputs(cfg, stage)])
        assert all_fingerprints(cfg) == fps
        assert not hash_cache_path(cfg).exists()  # nothing hashed, nothing written


def test_editing_a_dataset_file_in_place_makes_the_stage_stale_and_status_names_it(sft_run):
    overrides, data, _ = sft_run
    cfg = load_config(None, overrides)
    before = all_fingerprints(cfg)["sft"]
    sd = StageDir.of(cfg.run_dir, "sft")
    label = f"sft.dataset.source file {data}"
    assert json.loads(sd.fingerprint_path.read_text())["contents"][label] == ContentHashes(None).file(data)
    assert sd.manifest()["input_contents"] == json.loads(sd.fingerprint_path.read_text())["contents"]

    _edit_keeping_size(data, b'"2"', b'"3"')
    assert all_fingerprints(cfg)["sft"] != before
    st = stage_status(cfg, "sft")
    assert st.state == "stale" and st.changes == [f"input {label} changed"]
    assert st.line().startswith(f"sft        stale (input {label} changed)")
    assert run_stage("sft", overrides, _body) == 2  # refused without FORCE, like a config change

    _edit_keeping_size(data, b'"3"', b'"2"')  # the old content again: done again
    assert all_fingerprints(cfg)["sft"] == before and stage_status(cfg, "sft").state == "done"


def test_a_downstream_stage_says_which_upstream_file_changed(sft_run):
    overrides, data, _ = sft_run
    assert run_stage("reward", overrides, _body) == 0  # consumes this run's sft
    _edit_keeping_size(data, b'"2"', b'"5"')
    reward = stage_status(load_config(None, overrides), "reward")
    assert reward.state == "stale"
    assert reward.changes == [f"input 'sft' changed (sft.dataset.source file {data} changed)"]


def test_touching_a_file_without_changing_it_changes_nothing_and_the_cache_spares_the_reads(sft_run):
    overrides, data, _ = sft_run
    cfg = load_config(None, overrides)
    before = all_fingerprints(cfg)
    cache = hash_cache_path(cfg)
    key = os.path.abspath(data)
    assert json.loads(cache.read_text())[key][:2] == [data.stat().st_size, data.stat().st_mtime_ns]

    unchanged = ContentHashes(cache)
    assert input_contents(cfg, "sft", unchanged) and unchanged.hashed == []  # size and mtime match: not read

    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touch
    touched = ContentHashes(cache)
    input_contents(cfg, "sft", touched)
    assert touched.hashed == [key]  # read once to learn that nothing changed...
    touched.save()
    assert all_fingerprints(cfg) == before and stage_status(cfg, "sft").state == "done"
    again = ContentHashes(cache)
    input_contents(cfg, "sft", again)
    assert again.hashed == []  # ...and not again: the cache has the new mtime

    # the cached hash is what counts while size and mtime match (so a 10 GB corpus is read once, not per status)
    entries = json.loads(cache.read_text())
    entries[key][2] = "0" * 64
    cache.write_text(json.dumps(entries))
    assert input_contents(cfg, "sft")[f"sft.dataset.source file {data}"] == "0" * 64


def test_changed_weights_of_an_init_from_folder_change_the_fingerprint(sft_run):
    overrides, _, model = sft_run
    cfg = load_config(None, overrides)
    before = all_fingerprints(cfg)
    (model / "README.md").write_text("a model card says nothing about the weights")
    (model / ".cache").mkdir()
    (model / ".cache" / "x").write_text("nor does a hidden cache")
    assert all_fingerprints(cfg) == before
    (model / "model.safetensors").write_bytes(b"w2")
    after = all_fingerprints(cfg)
    assert after["sft"] != before["sft"] and after["reward"] != before["reward"]  # downstream follows
    assert after["pretrain"] == before["pretrain"]
    st = stage_status(cfg, "sft")
    assert st.state == "stale" and st.changes == [f"input sft.init_from folder {model} changed"]


def test_an_init_from_stage_artifact_of_ours_counts_by_its_manifest(tmp_path, sft_run):
    overrides, _, _ = sft_run
    artifact = StageDir.of(load_config(None, overrides).run_dir, "sft").artifact
    cfg = load_config(None, [f"run.root={tmp_path / 'other'}", f"reward.init_from={artifact}"])
    sft_fp = StageDir(artifact.parent).manifest()["fingerprint"]
    assert input_contents(cfg, "reward") == {f"reward.init_from folder {artifact}": f"manifest:{sft_fp}"}


def test_corpus_files_count_by_content_and_a_new_file_matching_the_glob_is_named(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("To be, or not to be")
    overrides = [f"run.root={tmp_path / 'runs'}", "data.corpus.source=files", f"data.corpus.paths=[{corpus}/*.txt]"]
    assert run_stage("tokenizer", overrides, _body) == 0
    cfg = load_config(None, overrides)
    before = all_fingerprints(cfg)
    (corpus / "b.txt").write_text("that is the question")
    after = all_fingerprints(cfg)
    assert after["tokenizer"] != before["tokenizer"] and after["pretrain"] != before["pretrain"]
    statuses = {s.stage: s for s in run_status(cfg)}
    assert statuses["tokenizer"].changes == [f"input data.corpus.paths file {corpus}/b.txt added"]
    (corpus / "b.txt").unlink()
    (corpus / "a.txt").write_text("To be, or not to be!")
    assert stage_status(cfg, "tokenizer").changes == [f"input data.corpus.paths file {corpus}/a.txt changed"]


def test_a_missing_dataset_file_is_an_input_state_not_a_crash(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", f"sft.dataset.source={tmp_path / 'nope.jsonl'}"])
    assert input_contents(cfg, "sft") == {f"sft.dataset.source file {tmp_path / 'nope.jsonl'}": "missing"}
    assert stage_status(cfg, "sft").state == "missing"
