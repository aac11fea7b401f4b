"""The whole pipeline on a micro config, through the real CLI (what `make all` runs).

- test_micro_pipeline_end_to_end: tokenizer -> pretrain -> sft -> reward -> ppo -> export in a temporary folder;
  checks every manifest, that a second run trains nothing, that an sft change marks exactly sft and its
  descendants stale, the export's reload in a fresh process without this project, and the run report.
- test_sigkill_anywhere_then_restart (slow): the pipeline killed with SIGKILL at random moments, several
  trials, restarted until done, ends with an export byte-identical to the uninterrupted run's.

The corpus is written by the test (task prompts and answers), so nothing is downloaded.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.lineage import all_fingerprints, stage_inputs
from pipeline.runs import STAGES, StageDir
from tests.helpers_launch import child_env

REPO = Path(__file__).resolve().parents[1]
REQUIRED_METRICS = {
    "pretrain": ("train_loss", "val_loss", "tokens", "tokens_per_s"),
    "sft": ("train_loss", "val_loss", "checker_accuracy"),
    "reward": ("pair_accuracy",),
    "ppo": ("reward_mean", "sft_reward_mean", "kl", "checker_accuracy"),
    "export": ("max_abs_logit_diff",),
}
MICRO = {
    "run": {"name": "micro", "seed": 7},
    "tokenizer": {"kind": "bpe", "vocab_size": 320, "train_bytes": 200_000},
    "data": {
        "corpus": {"source": "files", "paths": [], "txt_document_separator": "\n\n", "val_fraction": 0.1, "num_proc": 1},
        "tasks": {"n_sft_train": 64, "n_sft_eval": 8, "n_reward_train": 32, "n_reward_eval": 8, "n_ppo_train": 32, "n_ppo_eval": 8},
    },
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64},
    "pretrain": {"batch_size": 8, "max_steps": 20, "warmup_steps": 2, "eval_interval": 10, "eval_iters": 2,
                 "log_interval": 5, "ckpt_interval": 5, "num_threads": 1, "sample_tokens": 8,
                 "dtype": "float32"},  # the launch matrix compares launches at float32 summation order
    "sft": {"max_steps": 8, "batch_size": 8, "save_steps": 4, "logging_steps": 2, "n_eval_prompts": 8,
            "max_new_tokens": 8, "n_samples": 3},
    "reward": {"max_steps": 6, "batch_size": 8, "save_steps": 3, "logging_steps": 2, "norm_samples": 8, "norm_max_new_tokens": 8},
    "ppo": {"steps": 4, "rollout_batch_size": 8, "minibatch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8,
            "max_prompt_length": 32, "eval_interval": 2, "n_eval_prompts": 8, "ckpt_interval": 2, "n_samples": 3},
}  # fmt: skip
ENV = child_env(PIPELINE_PROGRESS="0")


def _micro_config(folder: Path) -> Path:
    """micro.yaml + its corpus (the task prompts with their answers, as plain text) in ``folder``."""
    from pipeline.data.tasks import generate_tasks

    folder.mkdir(parents=True, exist_ok=True)
    conf = json.loads(json.dumps(MICRO))
    conf["data"]["corpus"]["paths"] = [str(folder / "corpus.txt")]
    path = folder / "micro.yaml"
    path.write_text(yaml.safe_dump(conf))
    tasks = generate_tasks(load_config(path).data.tasks)
    docs = [f"{r['messages'][0]['content']} {r['answer']}" for r in tasks.sft_train] * 3
    (folder / "corpus.txt").write_text("\n\n".join(docs))
    return path


def _pipeline(*args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", *args]
    return subprocess.run(cmd, cwd=CODE, env=ENV, capture_output=True, text=True, check=False, **kw)


CODE = REPO
"""Where the pipeline runs from: a snapshot of the code taken once per module (see ``micro_run``)."""


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """One uninterrupted micro run (also the fault test's reference); returns (config path, overrides).

    The stage processes run from a copy of pipeline/, stages/ and configs/ taken now, so that the reference
    and the interrupted runs use the same code even while the working tree is being edited.
    """
    global CODE
    CODE = tmp_path_factory.mktemp("code")
    for name in ("pipeline", "stages", "configs"):
        shutil.copytree(REPO / name, CODE / name, ignore=shutil.ignore_patterns("__pycache__"))
    ENV["PYTHONPATH"] = str(CODE)
    folder = tmp_path_factory.mktemp("e2e")
    config, overrides = _micro_config(folder), [f"run.root={folder / 'runs'}"]
    t0 = time.time()
    res = _pipeline("run", "all", "--config", str(config), *overrides)
    assert res.returncode == 0, res.stderr[-4000:]
    print(f"micro pipeline: {time.time() - t0:.1f}s")
    return config, overrides


@pytest.mark.timeout(1200)  # about a minute alone on 2 cores; much more on a shared, loaded machine
def test_micro_pipeline_end_to_end(micro_run):
    config, overrides = micro_run
    cfg = load_config(config, overrides)
    fps = all_fingerprints(cfg)
    for stage in STAGES:  # every manifest: right fingerprint, inputs, metrics, artifact
        sd = StageDir.of(cfg.run_dir, stage)
        m = sd.manifest()
        assert m is not None and m["stage"] == stage and m["fingerprint"] == fps[stage], stage
        assert m["inputs"] == {u: fps[u] for u in stage_inputs(cfg, stage)}
        for key in REQUIRED_METRICS.get(stage, ()):
            assert isinstance(m["metrics"].get(key), (int, float)) and math.isfinite(m["metrics"][key]), (stage, key)
        assert m["wall_time_s"] > 0 and m["versions"]["transformers"] and any(sd.artifact.iterdir())
    assert StageDir.of(cfg.run_dir, "export").manifest()["metrics"]["max_abs_logit_diff"] <= 1e-5

    # a second run trains nothing and takes seconds
    mtimes = {s: StageDir.of(cfg.run_dir, s).manifest_path.stat().st_mtime for s in STAGES}
    t0 = time.time()
    again = _pipeline("run", "all", "--config", str(config), *overrides)
    assert again.returncode == 0 and time.time() - t0 < 10
    assert again.stderr.count("done, skipped") == len(STAGES) and "starting" not in again.stderr
    assert mtimes == {s: StageDir.of(cfg.run_dir, s).manifest_path.stat().st_mtime for s in STAGES}

    # one sft key changed: sft and everything after it is stale, pretrain stays done
    status = _pipeline("status", "--config", str(config), *overrides, "sft.lr=0.0001")
    states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[1:]}
    assert states == {
        "tokenizer": "done",
        "pretrain": "done",
        "sft": "stale",
        "reward": "stale",
        "ppo": "stale",
        "export": "stale",
    }
    assert "sft.lr: 0.0005 -> 0.0001" in status.stdout

    # the export works with plain transformers in a fresh process that does not import this project
    _check_export_in_fresh_process(cfg)

    # the run report
    rep = _pipeline("report", "--config", str(config), *overrides)
    assert rep.returncode == 0, rep.stderr[-2000:]
    text = (cfg.run_dir / "report.md").read_text()
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert (cfg.run_dir / "report" / f"{stage}.png").stat().st_size > 1000 and f"report/{stage}.png" in text
    assert "| prompt | pretrain | sft | ppo |" in text
    # the quality bar and where the reward model and the checker disagree, from the PPO stage's held-out answers
    assert "## Quality bar" in text and "## Reward model vs checker" in text and "**Verdict.**" in text
    ppo = StageDir.of(cfg.run_dir, "ppo")
    answers = [json.loads(line) for line in (ppo.root / "eval_answers.jsonl").read_text().splitlines()]
    summary = ppo.manifest()["rm_vs_checker"]
    assert len(answers) == summary["n"] == 8 and summary["tasks"]["all"]["n"] == 8
    assert summary["tasks"]["all"]["sft_accuracy"] == ppo.manifest()["metrics"]["sft_checker_accuracy"]
    by_kind = StageDir.of(cfg.run_dir, "reward").manifest()["pair_accuracy_by_kind"]
    n_pairs = sum(n for _, n in by_kind["all"].values())
    assert n_pairs == StageDir.of(cfg.run_dir, "reward").manifest()["data"]["eval_pairs"]
    assert "| task | right > near miss |" in text
    # before PPO: the SFT policy's greedy, pass@k and the reward model's best-of-k on held-out reward prompts
    reward_manifest = StageDir.of(cfg.run_dir, "reward").manifest()
    bok = reward_manifest["best_of_k"]
    n_prompts = len({g["prompt"] for g in _held_out_reward_prompts(cfg)})
    assert bok["k"] == 8 and bok["tasks"]["all"]["n"] == n_prompts
    for row in bok["tasks"].values():
        assert (
            0 <= row["greedy"] <= 1 and row["sampled"] <= row["pass_at_k"] and row["rm_best_of_k"] <= row["pass_at_k"]
        )
    assert f"| all | {n_prompts} | " in text and "The reward model's pick among 8 samples" in text
    # its greedy accuracy, recomputed here from the SFT artifact on the same prompts in the same batches
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.tasks import check_answer
    from pipeline.lm import generate_responses

    sft_dir = str(StageDir.of(cfg.run_dir, "sft").artifact)
    first: dict[str, dict] = {}
    for r in _held_out_reward_prompts(cfg):
        first.setdefault(r["prompt"], r)
    records = list(first.values())
    greedy = generate_responses(AutoModelForCausalLM.from_pretrained(sft_dir).eval(), AutoTokenizer.from_pretrained(sft_dir),
                                [r["prompt"] for r in records], cfg.reward.norm_max_new_tokens,
                                batch_size=cfg.reward.batch_size)  # fmt: skip
    assert bok["tasks"]["all"]["greedy"] == sum(map(check_answer, records, greedy)) / n_prompts


DEFAULT_RECIPE = [  # what configs/tiny.yaml sets for the reward and PPO stages, at micro size
    "reward.objective=dpo",
    "reward.dpo_nll_weight=1.0",
    "reward.on_policy_samples=2",
    "ppo.advantage=group",
    "ppo.samples_per_prompt=2",
]


@pytest.mark.timeout(1200)
def test_micro_pipeline_with_the_default_runs_reward_and_ppo_recipe(micro_run, tmp_path):
    """The orchestrator runs the default run's recipe (DPO + NLL reward model on on-policy pairs, group PPO
    against its implicit reward) after the micro run's tokenizer, pretrain and SFT stages, which stay done."""
    config, overrides = micro_run
    src = load_config(config, overrides).run_dir
    overrides = [f"run.root={tmp_path / 'runs'}", *DEFAULT_RECIPE]
    cfg = load_config(config, overrides)
    for stage in ("tokenizer", "pretrain", "sft"):
        shutil.copytree(src / stage, cfg.run_dir / stage)
    res = _pipeline("run", "all", "--config", str(config), *overrides)
    assert res.returncode == 0, res.stderr[-4000:]
    skipped = re.findall(r"^(\w+) +done, skipped", res.stderr, re.M)
    assert skipped == ["tokenizer", "pretrain", "sft"], res.stderr[-2000:]
    reward = StageDir.of(cfg.run_dir, "reward").manifest()
    assert reward["loss"].endswith("chosen NLL (RPO)") and reward["data"]["on_policy_pairs"] > 0
    assert (StageDir.of(cfg.run_dir, "reward").artifact / "implicit_reward.json").is_file()
    ppo = StageDir.of(cfg.run_dir, "ppo").manifest()
    for key in REQUIRED_METRICS["ppo"]:
        assert math.isfinite(ppo["metrics"][key]), key
    assert ppo["rm_vs_checker"]["n"] == 8
    assert StageDir.of(cfg.run_dir, "export").manifest()["metrics"]["max_abs_logit_diff"] <= 1e-5
    rep = _pipeline("report", "--config", str(config), *overrides)
    assert rep.returncode == 0, rep.stderr[-2000:]
    text = (cfg.run_dir / "report.md").read_text()
    assert "## Quality bar" in text and "**Verdict.**" in text and "The reward model's pick among 8 samples" in text


def _held_out_reward_prompts(cfg):
    from pipeline.data.tasks import generate_tasks

    return generate_tasks(cfg.data.tasks).reward_eval


_FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline
d = sys.argv[1]
tok, model = AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d)
gen = GenerationConfig.from_pretrained(d)
text = tok.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], tokenize=False, add_generation_prompt=True)
out = pipeline("text-generation", model=model, tokenizer=tok)([{"role": "user", "content": "Add 2 and 3."}], max_new_tokens=4)
print(json.dumps({"max_len": tok.model_max_length, "n_positions": model.config.n_positions, "eos": gen.eos_token_id,
                  "end": tok.convert_tokens_to_ids("<|end|>"), "eot": tok.convert_tokens_to_ids("<|endoftext|>"),
                  "text": text, "reply": out[0]["generated_text"][-1],
                  "project": [m for m in sys.modules if m.split(".")[0] in ("pipeline", "stages")]}))
"""


def _check_export_in_fresh_process(cfg) -> None:
    d = StageDir.of(cfg.run_dir, "export").artifact
    res = subprocess.run([sys.executable, "-I", "-c", _FRESH, str(d)], cwd="/", env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["max_len"] == got["n_positions"] == MICRO["model"]["block_size"]
    assert got["eos"] == [got["end"], got["eot"]] and got["project"] == []
    assert got["text"] == "<|user|>Add 2 and 3.<|end|><|assistant|>" and got["reply"]["role"] == "assistant"


def _first_unfinished(config: Path, overrides: list[str]) -> str:
    cfg = load_config(config, overrides)
    fps = all_fingerprints(cfg)
    return next((s for s in STAGES if StageDir.of(cfg.run_dir, s).state(fps[s]) != "done"), "none")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_anywhere_then_restart_gives_identical_export(micro_run, tmp_path):
    config, ref_overrides = micro_run
    reference = StageDir.of(load_config(config, ref_overrides).run_dir, "export").artifact
    rng = random.Random(1234)
    killed_in: list[str] = []
    for trial in range(4):
        overrides = [f"run.root={tmp_path / f'trial{trial}'}"]
        kills = 0
        while True:
            cmd = [sys.executable, "-m", "pipeline", "run", "all", "--config", str(config), *overrides]
            with open(tmp_path / f"trial{trial}.log", "a") as log:
                proc = subprocess.Popen(cmd, cwd=CODE, env=ENV, stdout=log, stderr=log, start_new_session=True)
                try:
                    rc = proc.wait(timeout=rng.uniform(2.0, 25.0) if kills < 5 else 900)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # the orchestrator and its stage process, at once
                    proc.wait()
                    kills += 1
                    killed_in.append(_first_unfinished(config, overrides))
                    continue
            assert rc == 0, (tmp_path / f"trial{trial}.log").read_text()[-4000:]
            break
        export = StageDir.of(load_config(config, overrides).run_dir, "export").artifact
        assert sorted(p.name for p in export.iterdir()) == sorted(p.name for p in reference.iterdir())
        for f in sorted(reference.iterdir(), key=lambda p: p.suffix != ".safetensors"):  # weights first
            assert f.read_bytes() == (export / f.name).read_bytes(), f"trial {trial}: {f.name} differs" + (
                "".join(
                    difflib.unified_diff(f.read_text().splitlines(True), (export / f.name).read_text().splitlines(True))
                )
                if f.suffix != ".safetensors"
                else ""
            )
    print("SIGKILLs landed in:", killed_in)
    assert len(killed_in) >= 3 and len(set(killed_in) - {"none"}) >= 2
