"""SIGTERM behaves the same in every training stage: a checkpoint, exit code 128+15, one message form; the same
command run again resumes and finishes.

Each stage runs as ``python -m stages.<stage>`` on a micro config in ``tmp_path``; its upstream stages are tiny
fakes (``tests/helpers_artifacts``), except pretrain's tokenizer, which the real tokenizer stage makes (pretrain
needs its token shards). SIGTERM is sent once the stage has written its first complete checkpoint.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.data.tasks import load_words
from pipeline.runs import StageDir
from tests.helpers_artifacts import make_fake_upstream, make_tokenizer
from tests.helpers_launch import child_env

ROOT = Path(__file__).resolve().parents[1]

MICRO = {
    "run": {"name": "sig", "seed": 3},
    "tokenizer": {"kind": "bpe", "vocab_size": 300},
    "data": {
        "corpus": {"source": "files", "paths": [], "txt_document_separator": "\n\n", "num_proc": 1},
        "tasks": {"n_sft_train": 96, "n_sft_eval": 8, "n_reward_train": 64, "n_reward_eval": 8,
                  "n_ppo_train": 16, "n_ppo_eval": 8},
    },
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
    "pretrain": {"batch_size": 4, "max_steps": 300, "warmup_steps": 5, "eval_interval": 100, "eval_iters": 2,
                 "log_interval": 5, "ckpt_interval": 5, "sample_tokens": 4, "keep_checkpoints": 2, "num_threads": 1},
    "sft": {"max_steps": 60, "batch_size": 8, "save_steps": 2, "logging_steps": 2, "n_eval_prompts": 4,
            "max_new_tokens": 4, "n_samples": 2},
    "reward": {"max_steps": 60, "batch_size": 8, "save_steps": 2, "logging_steps": 2, "norm_samples": 4,
               "norm_max_new_tokens": 4, "best_of_k": 2, "best_of_k_prompts": 4},
    "ppo": {"steps": 16, "rollout_batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 4,
            "max_prompt_length": 28, "eval_interval": 100, "n_eval_prompts": 4, "n_samples": 2, "ckpt_interval": 2},
}  # fmt: skip
UPSTREAM = {"pretrain": (), "sft": ("pretrain",), "reward": ("sft",), "ppo": ("tokenizer", "pretrain", "sft", "reward")}


def _config(tmp_path: Path) -> Path:
    """micro.yaml and its corpus (random words from the embedded word list) in ``tmp_path``."""
    rng, words = random.Random(0), load_words()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choices(words, k=40)) + "." for _ in range(600)) + "\n")
    conf = yaml.safe_load(yaml.safe_dump(MICRO))
    conf["run"]["root"] = str(tmp_path / "runs")
    conf["data"]["corpus"]["paths"] = [str(corpus)]
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def _stage_cmd(stage: str, config: Path) -> list[str]:
    return [sys.executable, "-m", f"stages.{stage}", "--config", str(config)]


def _prepare(stage: str, tmp_path: Path) -> tuple[list[str], StageDir]:
    config = _config(tmp_path)
    cfg = load_config(config)
    if stage == "pretrain":
        tok = subprocess.run(_stage_cmd("tokenizer", config), cwd=ROOT, env=child_env(), capture_output=True, text=True)
        assert tok.returncode == 0, tok.stderr[-3000:]
    tokenizer = make_tokenizer()
    for up in UPSTREAM[stage]:
        make_fake_upstream(cfg.run_dir, cfg, up, tokenizer=tokenizer, n_positions=64)
    return _stage_cmd(stage, config), StageDir.of(cfg.run_dir, stage)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo"])
def test_sigterm_checkpoints_exits_143_and_the_same_command_resumes(stage, tmp_path):
    cmd, sd = _prepare(stage, tmp_path)
    env = child_env(PIPELINE_PROGRESS="0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and sd.latest_checkpoint() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"{stage} ended before its first checkpoint:\n{proc.stderr.read()[-3000:]}"
    first = sd.latest_complete().step
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)

    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    line = next((x for x in err.splitlines() if x.startswith("interrupted: ")), "")
    step = sd.latest_complete().step
    assert line == (
        f"interrupted: {stage} stopped by SIGTERM at step {step}; a checkpoint was saved in {sd.checkpoints}. "
        "Run the same command again to resume."
    ), err[-3000:]
    assert step >= first and not sd.manifest_path.exists()

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sd.manifest() is not None and "resuming" in done.stderr
