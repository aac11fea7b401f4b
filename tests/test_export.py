"""Export stage: HF directory contents, portability (fresh process, transformers 4.x), errors, determinism.

Upstream stages are fakes (tests/fake_stages/artifacts.py): a tiny BPE tokenizer with the contract's chat
template and tiny GPT-2 models written as done stages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import gguf
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.__main__ import main as cli
from pipeline.config import ConfigError, load_config
from pipeline.export import GPT2_HUB_CONFIG_KEYS, export_model
from pipeline.export_verify import verify_export
from pipeline.gguf_export import write_ggufs
from pipeline.orchestrate import RunOptions, run_pipeline
from pipeline.publish import publish
from pipeline.runs import STAGES, StageDir
from stages.export import main as export_main
from tests.fake_stages.artifacts import make_fake_run
from tests.fake_stages.disk import small_disk  # noqa: F401 (fixture)

TF4_PYTHON = Path(os.environ.get("HF4_PYTHON", Path(__file__).resolve().parents[1] / ".venv-hf4" / "bin" / "python"))
"""An interpreter with transformers 4.x: ``$HF4_PYTHON``, else the checkout's ``.venv-hf4`` (``make test-interop``)."""


def _export(root: Path, *overrides: str) -> tuple[int, StageDir]:
    rc = export_main([f"run.root={root}", *overrides])
    return rc, StageDir.of(root / "tiny", "export")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """One fake run exported once (each export proves itself in a fresh process, which takes seconds)."""
    root = tmp_path_factory.mktemp("export")
    make_fake_run(root)
    rc, _ = _export(root, *_FIXTURE_OVERRIDES)
    assert rc == 0
    return root


_FIXTURE_OVERRIDES = ("export.license=apache-2.0", "export.formats=[hf,gguf]", "export.gguf_types=[f32,q8_0]")


def test_export_is_a_complete_portable_hf_directory(exported):
    sd = StageDir.of(exported / "tiny", "export")
    out = sd.artifact
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md"} <= names  # fmt: skip
    tok = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    tok_conf = json.loads((out / "tokenizer_config.json").read_text())
    # the model's real limits and stop tokens; every key GPT-2's Hub configs have (n_ctx: llama.cpp's converter)
    assert tok.model_max_length == config["n_positions"] == config["n_ctx"] == 64
    assert set(GPT2_HUB_CONFIG_KEYS) <= set(config) and config["use_cache"] is True
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    assert gen["pad_token_id"] == tok.pad_token_id == tok.convert_tokens_to_ids("<|pad|>")
    assert (gen["do_sample"], gen["temperature"], gen["max_new_tokens"]) == (True, 1.0, 32)  # ppo's rollout settings
    # written for transformers 4.x and 5.x alike
    assert tok_conf["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in tok_conf
    assert tok_conf["additional_special_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) == (
        "<|user|>hi<|end|><|assistant|>"
    )
    # exported weights equal the ppo policy's
    src = AutoModelForCausalLM.from_pretrained(exported / "tiny/ppo/artifact")
    exp = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(src.state_dict().items(), exp.state_dict().items()):
        assert torch.equal(a, b), name
    manifest = sd.manifest()
    assert manifest["metrics"]["max_abs_logit_diff"] <= 1e-5
    check = manifest["verification"][0]
    assert check["ok"] and check["model_max_length"] == 64 and check["pipeline_reply"]["role"] == "assistant"
    assert check["python"] and check["transformers"].startswith("5.")


def test_model_card_metadata(exported):
    text = (exported / "tiny/export/artifact/README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert any("shakespeare" in d for d in meta["datasets"]) and any("generated tasks" in d for d in meta["datasets"])
    assert [x["stage"] for x in meta["lineage"]] == ["tokenizer", "pretrain", "sft", "reward", "ppo"]
    fps = {s: StageDir.of(exported / "tiny", s).manifest()["fingerprint"] for s in ("tokenizer", "ppo")}
    assert meta["lineage"][0]["fingerprint"] == fps["tokenizer"] and meta["lineage"][-1]["fingerprint"] == fps["ppo"]
    assert meta["lineage"][1]["metrics"] == {"train_loss": 2.5, "val_loss": 2.6, "tokens": 1000}  # no tokens_per_s
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert {"type": "checker_accuracy", "value": 0.6} in metrics


def test_export_is_deterministic(exported, tmp_path):
    cfg = load_config(None, [f"run.root={exported}", *_FIXTURE_OVERRIDES])
    manifests = {s: StageDir.of(cfg.run_dir, s).manifest() for s in ("tokenizer", "pretrain", "sft", "reward", "ppo")}
    export_model(cfg, tmp_path / "again", manifests)
    a = exported / "tiny/export/artifact"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in (tmp_path / "again").iterdir())
    for f in sorted(a.iterdir()):
        assert f.read_bytes() == (tmp_path / "again" / f.name).read_bytes(), f.name
    for t, info in write_ggufs(a, tmp_path, "tiny", cfg.export.gguf_types, cfg.export.license).items():
        assert info.path.read_bytes() == (exported / f"tiny/export/tiny-{t}.gguf").read_bytes(), t


def test_gguf_files_lie_beside_the_export_and_its_copy(exported, tmp_path):
    sd = StageDir.of(exported / "tiny", "export")
    names = ["tiny-f32.gguf", "tiny-q8_0.gguf"]
    assert sorted(p.name for p in sd.root.glob("*.gguf")) == names  # beside artifact/
    g = sd.manifest()["gguf"]
    assert g["pre_tokenizer"] == "gpt-2" and sorted(g["files"]) == names
    if "skipped" in g["verification"]:  # llama_cpp is not in the default venv: the manifest says so, and why
        assert (
            "cannot import llama_cpp" in g["verification"]["skipped"]
            and "make test-interop" in g["verification"]["skipped"]
        )
    else:
        assert g["verification"]["ok"], g["verification"]["problems"]
    r = gguf.GGUFReader(sd.root / "tiny-q8_0.gguf")
    assert r.fields["general.name"].contents() == "tiny" and r.fields["general.license"].contents() == "apache-2.0"
    card = (sd.artifact / "README.md").read_text()
    assert "## Run it in llama.cpp" in card and "tiny-q8_0.gguf" in card
    # EXPORT_DIR: the copies lie beside the copied folder; a different file there is moved aside, not overwritten
    dest = tmp_path / "pub" / "model"
    assert publish(sd.artifact, dest, exported / "tiny")
    assert sorted(p.name for p in dest.parent.glob("*.gguf")) == names
    assert not publish(sd.artifact, dest, exported / "tiny")  # identical copies: nothing to do
    (dest.parent / "tiny-f32.gguf").write_bytes(b"someone else's file")
    assert publish(sd.artifact, dest, exported / "tiny")
    assert (dest.parent / "tiny-f32.gguf").read_bytes() == (sd.root / "tiny-f32.gguf").read_bytes()
    assert [p.read_bytes() for p in dest.parent.glob("tiny-f32.gguf.old-*")] == [b"someone else's file"]


def test_verification_catches_a_different_model(exported):
    other = AutoModelForCausalLM.from_pretrained(exported / "tiny/sft/artifact")
    # a relative interpreter path (as `make test-interop` passed .venv-hf4/bin/python) works: the child runs elsewhere
    res = verify_export(exported / "tiny/export/artifact", other, python=os.path.relpath(sys.executable))
    assert not res["ok"] and "logits differ" in res["problems"][0] and res["max_abs_logit_diff"] > 1e-3


def test_bf16_sharded_export_reloads_equal(tmp_path):
    make_fake_run(tmp_path)
    rc, sd = _export(tmp_path, "export.dtype=bfloat16", "export.max_shard_size=40KB", f"export.dir={tmp_path / 'copy'}")
    assert rc == 0
    shards = sorted(p.name for p in sd.artifact.glob("*.safetensors"))
    assert len(shards) > 1 and (sd.artifact / "model.safetensors.index.json").exists()
    assert json.loads((sd.artifact / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")  # the EXPORT_DIR copy
    assert model.dtype == torch.bfloat16
    src = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny/ppo/artifact").to(torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), model.state_dict().values()))
    assert sd.manifest()["metrics"]["max_abs_logit_diff"] <= 1e-5
    assert not publish(sd.artifact, tmp_path / "copy", tmp_path / "tiny")  # identical copy already there: nothing to do


def test_truncated_source_weights_are_named_and_nothing_is_lost(tmp_path, capsys):
    make_fake_run(tmp_path)
    weights = tmp_path / "tiny/ppo/artifact/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    rc, sd = _export(tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and "model.safetensors: truncated" in err and "FORCE=1" in err
    assert sd.manifest() is None and not sd.artifact.exists()
    assert all(StageDir.of(tmp_path / "tiny", s).manifest() for s in ("tokenizer", "pretrain", "sft", "reward", "ppo"))


def test_missing_source_stage(tmp_path, capsys):
    make_fake_run(tmp_path, stages=("tokenizer", "pretrain", "sft", "reward"))
    rc, _ = _export(tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and "needs the 'ppo' stage's artifact" in err and "make ppo" in err


def test_full_disk_during_export_is_a_clear_error(small_disk, tmp_path, capsys):  # noqa: F811 (fixture)
    make_fake_run(small_disk)
    free = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 60_000))  # the weights need ~150 kB
    rc, sd = _export(small_disk)
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "Nothing earlier was changed" in err
    assert not sd.artifact.exists() and not sd.artifact.with_name("artifact.tmp").exists()
    assert StageDir.of(small_disk / "tiny", "ppo").manifest() is not None
    filler.unlink()
    assert _export(small_disk)[0] == 0


@pytest.mark.skipif(
    not TF4_PYTHON.exists(),
    reason=f"interop check skipped: transformers 4.x loading the export needs the venv {TF4_PYTHON} "
    "(`make test-interop` builds it and runs this check)",
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_loads_in_transformers_4(tmp_path, dtype):
    make_fake_run(tmp_path)
    rc, sd = _export(
        tmp_path, f"export.dtype={dtype}", "export.max_shard_size=40KB", f"export.verify_with={TF4_PYTHON}"
    )
    assert rc == 0
    checks = {c["transformers"].split(".")[0]: c for c in sd.manifest()["verification"]}
    assert set(checks) == {"4", "5"}
    tf4 = checks["4"]
    assert tf4["ok"] and tf4["max_abs_logit_diff"] <= 1e-5 and tf4["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tf4["model_max_length"] == tf4["n_positions"] == 64 and tf4["dtype"] == dtype
    assert tf4["eos_token_id"] == checks["5"]["eos_token_id"] and tf4["pipeline_reply"] == checks["5"]["pipeline_reply"]


_ZERO3_CHECKPOINT = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
import deepspeed
from transformers import GPT2Config, GPT2LMHeadModel
out = sys.argv[1]
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=320, eos_token_id=0, bos_token_id=0))
m.save_pretrained(out + "/reference")
cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(m.parameters()), config=cfg)
engine.save_checkpoint(out + "/zero")  # parameters partitioned: no plain weight file
m.config.save_pretrained(out + "/zero")
"""


@pytest.mark.slow
def test_zero3_checkpoint_is_consolidated(tmp_path):
    pytest.importorskip("deepspeed")
    from pipeline.export import load_source_model

    res = subprocess.run([sys.executable, "-c", _ZERO3_CHECKPOINT, str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "zero/latest").exists() and not list((tmp_path / "zero").glob("*.safetensors"))
    model = load_source_model(tmp_path / "zero", allow_pickle=True)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "reference")
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied


def test_chat_streams_the_greedy_answer_through_the_chat_template(exported):
    import io

    from pipeline.chat import ChatSettings, chat_loop, resolve_model_dir

    cfg = load_config(None, [f"run.root={exported}"])
    model_dir = resolve_model_dir(cfg)
    assert model_dir == exported / "tiny/export/artifact"  # the newest done stage
    assert resolve_model_dir(cfg, "sft") == exported / "tiny/sft/artifact"
    lines = iter(["What is 12 + 7?", "/reset", "/quit", "never read"])
    out = io.StringIO()
    assert chat_loop(model_dir, ChatSettings(temperature=0, max_new_tokens=6), lambda _: next(lines), out) == 0
    assert next(lines) == "never read"  # stopped at /quit
    streamed = out.getvalue().split("model> ")[1].rstrip("\n")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], add_generation_prompt=True)
    ids = torch.tensor([ids["input_ids"] if hasattr(ids, "keys") else ids])
    greedy = model.generate(
        ids,
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=[tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
    )
    assert streamed == tok.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True)
    eof = io.StringIO()
    assert chat_loop(model_dir, ChatSettings(), lambda _: (_ for _ in ()).throw(EOFError), eof) == 0


def test_report_tables_and_plots(exported):
    from pipeline.report import write_report

    path = write_report(load_config(None, [f"run.root={exported}"]), samples=False)
    text = path.read_text()
    assert (
        "| pretrain | done | 2.0 s | 10 tokens/s | train_loss=2.5, val_loss=2.6, tokens=1000, tokens_per_s=10 |" in text
    )
    assert "| ppo | done | 5.0 s |" in text and "Total wall time of done stages" in text
    for stage in ("pretrain", "sft", "reward"):  # the fakes' metrics.jsonl hold train/val loss
        assert (path.parent / "report" / f"{stage}.png").stat().st_size > 1000 and f"report/{stage}.png" in text
    assert "transformers 5." in text and ": ok" in text


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def nothing_moves(monkeypatch):
    """Whatever export.dir names, nothing is copied or moved (a regression must not move the repository aside)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"publish touched files: {args}")

    monkeypatch.setattr("pipeline.publish.shutil", types.SimpleNamespace(copytree=refuse, rmtree=refuse))
    monkeypatch.setattr("pipeline.publish.os", types.SimpleNamespace(replace=refuse))
    monkeypatch.setattr(StageDir, "move_aside", refuse)


_TARGETS = {
    "run root": lambda root: root,
    "run folder": lambda root: root / "tiny",
    "stage folder": lambda root: root / "tiny/sft",
    "inside a stage": lambda root: root / "tiny/ppo/artifact",
    "parent of the run root": lambda root: root.parent,
    "repository": lambda root: REPO,
    "parent of the repository": lambda root: REPO.parent,
    "dot": lambda root: ".",
    "dotdot": lambda root: "..",
    "filesystem root": lambda root: "/",
    "the checkout's .git": lambda root: REPO / ".git",
    "a source folder": lambda root: REPO / "pipeline",
    "a file": lambda root: REPO / "README.md",
    "a folder of other files": lambda root: _other_files(root.parent / "notes"),
}


def _other_files(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "todo.txt").write_text("mine")
    return d


@pytest.mark.parametrize("where", list(_TARGETS))
def test_export_dir_holding_the_run_or_the_repository_is_refused(tmp_path, capsys, nothing_moves, where):
    root = tmp_path / "runs"
    make_fake_run(root)
    target = _TARGETS[where](root)
    rc, sd = _export(root, f"export.dir={target}")
    err = capsys.readouterr().err
    assert rc == 2 and "export.dir" in err and str(target) in err, err
    assert sd.manifest() is None and not sd.artifact.exists()
    assert all(StageDir.of(root / "tiny", s).manifest() for s in STAGES[:-1])
    assert not list(root.glob("*.old-*")) and not list(root.glob("tiny/*.old-*"))


def test_pipeline_export_refuses_the_run_root_before_running_anything(tmp_path, capsys, nothing_moves):
    root = tmp_path / "runs"
    env = {"PYTHONPATH": str(REPO)}
    opts = RunOptions(None, (f"run.root={root}", f"export.dir={root}"), module_prefix="tests.fake_stages", env=env)
    with pytest.raises(ConfigError, match=r"export.dir"):
        run_pipeline("export", opts)
    assert not root.exists()  # refused before any stage ran
    assert run_pipeline("all", RunOptions(None, (f"run.root={root}",), module_prefix="tests.fake_stages", env=env)) == 0
    for target in (root, root / "tiny", tmp_path, "."):
        assert cli(["export", f"run.root={root}", f"export.dir={target}"]) == 2
        err = capsys.readouterr().err
        assert f"error: export.dir={target}: " in err
    assert sorted(p.name for p in (root / "tiny").iterdir()) == sorted(STAGES)


def test_export_dir_may_be_new_empty_or_an_earlier_export(tmp_path):
    from pipeline.publish import check_export_dir

    run_dir = tmp_path / "runs" / "tiny"
    assert check_export_dir(tmp_path / "new", run_dir) == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    assert check_export_dir(tmp_path / "empty", run_dir) == (tmp_path / "empty").resolve()
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / "model.safetensors").write_bytes(b"")
    assert check_export_dir(old, run_dir) == old.resolve()


def test_gguf_asked_of_a_done_export_is_added_without_making_it_again(tmp_path, capfd):
    """`make all` then `make export FORMAT=gguf` (issue 16): the export was stale on export.formats; now the done
    export gets the GGUF files it lacks, its HF directory and fingerprint unchanged, through the stage and the
    orchestrator alike."""
    from pipeline.lineage import all_fingerprints

    root = tmp_path / "runs"
    make_fake_run(root)
    rc, sd = _export(root)
    assert rc == 0 and not list(sd.root.glob("*.gguf"))
    hf_before = {p.name: p.read_bytes() for p in sd.artifact.iterdir()}
    fp = sd.manifest()["fingerprint"]
    capfd.readouterr()
    rc, sd = _export(root, "export.formats=[hf,gguf]", "export.gguf_types=[f32,q8_0]")
    assert rc == 0 and "adding the GGUF files it lacks (f32, q8_0)" in capfd.readouterr().err
    assert sorted(p.name for p in sd.root.glob("*.gguf")) == ["tiny-f32.gguf", "tiny-q8_0.gguf"]
    m = sd.manifest()
    assert m["fingerprint"] == fp and sorted(m["gguf"]["files"]) == ["tiny-f32.gguf", "tiny-q8_0.gguf"]
    assert {p.name: p.read_bytes() for p in sd.artifact.iterdir()} == hf_before
    cfg = load_config(None, [f"run.root={root}", "export.formats=[hf,gguf]"])
    assert all_fingerprints(cfg)["export"] == fp  # what it is does not depend on the files derived beside it
    # the orchestrator sees a done export that lacks the f16 file and launches the stage for it
    opts = RunOptions(None, (f"run.root={root}", "export.formats=[hf,gguf]"), env={"PYTHONPATH": str(REPO)})
    assert run_pipeline("export", opts) == 0
    assert (sd.root / "tiny-f16.gguf").is_file() and "tiny-f16.gguf" in sd.manifest()["gguf"]["files"]
    assert {p.name: p.read_bytes() for p in sd.artifact.iterdir()} == hf_before
