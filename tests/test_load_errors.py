"""A model or dataset the config names that cannot be loaded is a clear error (exit 2) naming the config key, the
value and what is wrong, never a traceback, and it is found before the stage does any work.

- models (``pipeline/model_source.py``): ``pretrain.init_from``, ``sft.init_from``, ``reward.init_from``,
  ``ppo.policy_from``, ``ppo.reward_from`` and ``python -m pipeline chat --model``: a missing folder, an empty or
  half folder (the missing files listed), a damaged weight file, a Hub id offline and not cached; a cached Hub id
  still loads;
- Hub datasets (``pipeline/data/loader.py``): ``<stage>.dataset.source`` / ``eval_source`` naming a Hub dataset that
  cannot be reached (offline here), does not exist, or has no such split.

The stage rows run the stage's entry point in-process with its loaders replaced by ones that fail the test, so a
check that comes too late (after work started) fails too. Offline throughout (``tests/conftest.py``).
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest

from pipeline.__main__ import main as pipeline_main
from pipeline.config import DatasetSpec, TasksConfig, load_config
from pipeline.data.conversations import load_sft_data
from pipeline.data.preferences import load_preferences
from pipeline.data.prompts import load_prompts
from pipeline.data.records import BadRecord, Record
from pipeline.model_source import check_model_source, check_model_sources
from pipeline.runs import StageError
from tests.fake_stages.artifacts import make_fake_run

UPSTREAM = ("tokenizer", "pretrain", "sft", "reward")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake run with the stages before PPO done (made once, copied by :func:`run`)."""
    root = tmp_path_factory.mktemp("base") / "runs"
    make_fake_run(root, stages=UPSTREAM)
    return root


@pytest.fixture
def run(base_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake run copied into the test's folder, which is the current folder (relative paths are as a user's)."""
    shutil.copytree(base_run, tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)  # a stage sets it: restored after the test
    return tmp_path / "runs"


@pytest.fixture
def model_dir(base_run: Path) -> Path:
    """A complete model folder (the fake SFT artifact)."""
    return base_run / "tiny" / "sft" / "artifact"


def _folder(tmp_path: Path, name: str, files: dict[str, bytes] | None = None) -> Path:
    d = tmp_path / name
    d.mkdir()
    for f, content in (files or {}).items():
        (d / f).write_bytes(content)
    return d


def _fake_hub_cache(root: Path, repo_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hugging Face cache at ``root`` holding ``repo_id``'s ``config.json`` (what a download once left)."""
    from huggingface_hub import constants

    commit = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text('{"model_type": "gpt2"}')
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))


# ----------------------------------------------------------------------------- the check itself


def test_missing_local_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError) as e:
        check_model_source("sft.init_from", "./nope")
    msg = str(e.value)
    assert msg.startswith("sft.init_from='./nope': not found locally")
    assert str(tmp_path / "nope") in msg


def test_empty_folder_lists_what_is_missing(tmp_path: Path) -> None:
    empty = _folder(tmp_path, "empty")
    with pytest.raises(StageError) as e:
        check_model_source("reward.init_from", empty)
    msg = str(e.value)
    assert msg.startswith(f"reward.init_from='{empty}': the folder {empty} holds no usable model: missing")
    for what in ("config.json", "model weights", "tokenizer files"):
        assert what in msg


def test_half_folder_lists_only_what_is_missing(tmp_path: Path, model_dir: Path) -> None:
    half = _folder(tmp_path, "half", {f: (model_dir / f).read_bytes() for f in ("config.json", "tokenizer.json")})
    with pytest.raises(StageError) as e:
        check_model_source("ppo.policy_from", half)
    assert "missing model weights" in str(e.value)
    assert "config.json" not in str(e.value).split("missing")[1] and "tokenizer" not in str(e.value)


def test_pretrain_init_from_needs_no_tokenizer(tmp_path: Path, model_dir: Path) -> None:
    weights_only = _folder(
        tmp_path, "w", {f: (model_dir / f).read_bytes() for f in ("config.json", "model.safetensors")}
    )
    cfg = load_config(None, [f"pretrain.init_from={weights_only}", f"sft.init_from={weights_only}"])
    check_model_sources(cfg, "pretrain")  # GPT-2 weights into the project's own tokenizer: no tokenizer needed
    with pytest.raises(StageError, match=r"sft.init_from=.*missing tokenizer files"):
        check_model_sources(cfg, "sft")
    with pytest.raises(StageError, match=r"^pretrain.init_from='\./nope': not found locally"):
        check_model_sources(load_config(None, ["pretrain.init_from=./nope"]), "pretrain")


def test_damaged_weights_are_named(tmp_path: Path, model_dir: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:100])
    with pytest.raises(StageError, match=r"sft.init_from=.*damaged: .*model.safetensors: truncated"):
        check_model_source("sft.init_from", bad)


def test_a_file_is_not_a_model_folder(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(StageError, match="is a file, not a model folder"):
        check_model_source("ppo.reward_from", f)


def test_complete_folder_passes(model_dir: Path) -> None:
    check_model_source("sft.init_from", model_dir)


@pytest.mark.parametrize("name", ["nope", "org/name"])
def test_hub_id_offline_not_cached_is_named(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(StageError) as e:
        check_model_source("sft.init_from", name)
    msg = str(e.value)
    assert msg.startswith(f"sft.init_from='{name}': no local folder of that name")
    assert "not reachable offline (HF_HUB_OFFLINE=1)" in msg and "not in the local Hugging Face cache" in msg


def test_hub_id_is_still_tried_on_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id is legitimate: one in the cache passes offline (the check asks the Hub's client, not a rule)."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(tmp_path / "hf-cache", "org/cached", monkeypatch)
    check_model_source("sft.init_from", "org/cached")
    check_model_sources(load_config(None, ["ppo.policy_from=org/cached", "ppo.reward_from=org/cached"]), "ppo")


# ----------------------------------------------------------------------------- the stages: exit 2 before any work


def _no_work(name: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"the stage started work ({name}) before checking its model keys")

    return fail


STAGE_LOADERS = {"sft": "load_model_and_tokenizer", "reward": "_load_data", "ppo": "load_models"}


@pytest.mark.parametrize(
    "stage,key",
    [("sft", "sft.init_from"), ("reward", "reward.init_from"), ("ppo", "ppo.policy_from"), ("ppo", "ppo.reward_from")],
)
@pytest.mark.parametrize("value,says", [("./nope", "not found locally"), ("empty", "holds no usable model: missing config.json"),
                                        ("nope", "not reachable offline")])  # fmt: skip
def test_stage_bad_model_key_exits_2_before_work(
    stage: str,
    key: str,
    value: str,
    says: str,
    run: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(run.parent / "hf-cache"))
    if value == "empty":
        value = str(_folder(run.parent, "empty"))
    shutil.rmtree(run / "tiny" / stage, ignore_errors=True)  # the stage to run is not done yet
    module = importlib.import_module(f"stages.{stage}")
    monkeypatch.setattr(module, STAGE_LOADERS[stage], _no_work(STAGE_LOADERS[stage]))
    rc = module.main([f"{key}={value}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"error: {key}='{value}': " in err and says in err
    assert "Traceback" not in err


def test_chat_bad_model_exits_2(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = _folder(run.parent, "empty")
    assert pipeline_main(["chat", "--model", "./nope"]) == 2
    assert "error: --model='./nope': not found locally" in capsys.readouterr().err
    assert pipeline_main(["chat", "--model", str(empty)]) == 2
    assert f"error: --model='{empty}': the folder {empty} holds no usable model: missing config.json" in (
        capsys.readouterr().err
    )


# ----------------------------------------------------------------------------- Hub datasets

LOADERS = [("sft.dataset", load_sft_data), ("reward.dataset", load_preferences), ("ppo.dataset", load_prompts)]


@pytest.mark.parametrize("section,load", LOADERS)
@pytest.mark.parametrize("field", ["source", "eval_source"])
def test_unreachable_hub_dataset_names_the_key(section: str, load, field: str, tmp_path: Path) -> None:
    """Offline (conftest): the Hub cannot be reached and ``nope/nope`` is in no cache."""
    if field == "source":
        spec = DatasetSpec(source="hub:nope/nope")
    else:
        data = tmp_path / "d.jsonl"
        row = (
            '{"prompt": "hi", "chosen": "a", "rejected": "b"}' if section == "reward.dataset" else
            '{"prompt": "hi", "completion": "yo"}'
        )  # fmt: skip
        data.write_text(row + "\n")
        spec = DatasetSpec(source=str(data), eval_source="hub:nope/nope")
    with pytest.raises(StageError) as e:
        load(spec, TasksConfig(), 0)
    msg = str(e.value)
    assert msg.startswith(f"{section}.{field}='hub:nope/nope': cannot load the Hub dataset 'nope/nope' (split 'train')")
    assert "offline mode is on" in msg and "Couldn't reach 'nope/nope'" in msg


def _reading_raises(exc: Exception):
    def read_records(*args, **kwargs):
        raise exc
        yield  # a generator, as the real one: the error comes while the records are read

    return read_records


@pytest.mark.parametrize(
    "exc,says",
    [
        (ConnectionError("Couldn't reach 'org/qa' on the Hub (ConnectTimeout)"), "the Hub could not be reached"),
        (type("DatasetNotFoundError", (FileNotFoundError,), {})("Dataset 'org/qa' doesn't exist on the Hub"),
         "no such dataset on the Hub"),
        (ValueError('Unknown split "tain". Should be one of [\'train\'].'), "ValueError: Unknown split"),
    ],
)  # fmt: skip
def test_hub_dataset_causes(exc: Exception, says: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr("pipeline.data.loader.read_records", _reading_raises(exc))
    with pytest.raises(StageError) as e:
        load_prompts(DatasetSpec(source="hub:org/qa", split="tain", hub_config="main"), TasksConfig(), 0)
    msg = str(e.value)
    assert msg.startswith("ppo.dataset.source='hub:org/qa': cannot load the Hub dataset 'org/qa' (split 'tain', "
                          "config 'main'): ")  # fmt: skip
    assert says in msg


def test_bad_hub_record_and_missing_file_are_not_relabelled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only a failure to load is a Hub error: a bad record keeps naming its row, a missing local file stays one."""

    def read_records(source, *args, **kwargs):
        yield Record(f"{source}[train] row 0", {"nothing": "useful"})

    monkeypatch.setattr("pipeline.data.loader.read_records", read_records)
    with pytest.raises(BadRecord, match=r"hub:org/qa\[train\] row 0"):
        load_sft_data(DatasetSpec(source="hub:org/qa"), TasksConfig(), 0)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        load_sft_data(DatasetSpec(source=str(tmp_path / "none.jsonl")), TasksConfig(), 0)


def test_sft_stage_unreachable_hub_dataset_exits_2(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m stages.sft sft.dataset.source=hub:nope/nope`` with pretrain done (the fake one)."""
    from stages.sft import main

    shutil.rmtree(run / "tiny" / "sft")
    rc = main(["sft.dataset.source=hub:nope/nope"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error: sft.dataset.source='hub:nope/nope': cannot load the Hub dataset 'nope/nope'" in err
    assert "Traceback" not in err
