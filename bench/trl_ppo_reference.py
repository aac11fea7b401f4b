"""The reference side of the PPO comparison (issue #6): TRL 1.12.0's ``trl.experimental.ppo.PPOTrainer`` on CPU.

Runs in its own venv (``.venv-bench`` from ``make bench-env``: torch 2.13.0+cpu, trl 1.12.0, transformers 5.23),
so it imports nothing from the project's ``pipeline`` package. It loads the policy (and a second copy as the
frozen reference) from ``--policy``, the reward model and the value model (a second copy, trained) from
``--reward``, turns each prompt of ``--prompts`` (jsonl, field ``prompt``: a user message) into ``input_ids``
with the tokenizer's chat template (``add_generation_prompt=True``), runs ``--steps`` PPO steps of ``--batch``
prompts and writes one JSON file with the wall time, prompts/s, generation tokens/s and TRL's per-step metrics.

    .venv-bench/bin/python bench/trl_ppo_reference.py --policy runs/trlbench/policy \\
        --reward runs/trlbench/reward --prompts runs/trlbench/prompts.jsonl --batch 16 --mini-batches 2 \\
        --ppo-epochs 1 --response-length 16 --steps 2 --out runs/trlbench/trl.json

Batch mapping (TRL 1.12 semantics, one process): ``per_device_train_batch_size = batch``,
``gradient_accumulation_steps = 1`` so TRL's batch (per_device * grad_accum * processes) is ``--batch``, its
minibatch is ``batch / num_mini_batches`` (one optimizer step each: ``ppo_epochs * mini_batches`` steps per PPO
step), ``total_episodes = steps * batch`` so it runs exactly ``--steps`` batches, and generation plus the
rollout forwards run on ``--rollout-batch`` prompts at a time (default: the whole batch). TRL with
``gradient_accumulation_steps > 1`` and several minibatches steps the optimizer once per
``gradient_accumulation_steps`` microbatches across minibatch boundaries, so it is not used here.

Generation stops at ``<|end|>`` (the chat turn end) when the tokenizer has it, else at eos. TRL 1.12 checks
"the response ended" (``missing_eos_penalty``, ``val/num_eos_tokens``) with ``tokenizer.eos_token_id``, not the
stop token, so the tokenizer's eos is set to the stop token for the run (``eos_set_to_stop`` in the output).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STOP_TOKEN = "<|end|>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="TRL 1.12 PPOTrainer reference run on CPU (issue #6).")
    p.add_argument("--policy", required=True, help="HF causal LM dir with a chat-template tokenizer")
    p.add_argument("--reward", required=True, help="AutoModelForSequenceClassification dir (num_labels=1)")
    p.add_argument("--prompts", required=True, help='jsonl with a "prompt" field (user message) per line')
    p.add_argument("--batch", type=int, required=True, help="prompts per PPO step (rollout batch)")
    p.add_argument("--mini-batches", type=int, default=1, help="minibatches per PPO epoch (divides --batch)")
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--response-length", type=int, required=True, help="max new tokens per response")
    p.add_argument("--steps", type=int, required=True, help="PPO steps (batches)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=3e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="results JSON path")
    # the rest default to TRL 1.12's PPOConfig defaults
    p.add_argument(
        "--rollout-batch", type=int, default=None, help="local_rollout_forward_batch_size (default: --batch)"
    )
    p.add_argument("--kl-estimator", choices=["k1", "k3"], default="k1")
    p.add_argument("--cliprange", type=float, default=0.2)
    p.add_argument("--cliprange-value", type=float, default=0.2)
    p.add_argument("--vf-coef", type=float, default=0.1)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--whiten-rewards", action="store_true")
    p.add_argument("--missing-eos-penalty", type=float, default=None)
    p.add_argument("--lr-scheduler", default="linear", help="TrainingArguments.lr_scheduler_type (TRL: linear)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="unused by TRL 1.12's PPO loop (recorded only)")
    p.add_argument(
        "--normalize-reward",
        action="store_true",
        help="score = (rm - mean) / std with reward_stats.json of --reward (what the project's PPO optimises)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    a = p.parse_args(argv)
    problems = []
    for name in ("batch", "mini_batches", "ppo_epochs", "response_length", "steps"):
        if getattr(a, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.batch >= 1 and a.mini_batches >= 1 and a.batch % a.mini_batches:
        problems.append(f"--batch {a.batch} must be a multiple of --mini-batches {a.mini_batches}")
    if a.temperature <= 0:
        problems.append(f"--temperature must be > 0, got {a.temperature}")
    if problems:
        p.error("; ".join(problems))
    return a


def read_prompts(path: str) -> list[str]:
    """The ``prompt`` strings of a jsonl file; errors name the file and line."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
                raise SystemExit(f'{path}:{lineno}: field "prompt" must be a non-empty string')
            prompts.append(rec["prompt"])
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return prompts


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    """``input_ids`` of one user turn + the assistant generation prompt."""
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding by default
        out = out["input_ids"]
    return [int(i) for i in out]


class GenerationMeter:
    """Wraps ``model.generate`` to time generation and count generated and response tokens."""

    def __init__(self, model: Any, stop_id: int | None, pad_id: int) -> None:
        self.model, self.stop_id, self.pad_id = model, stop_id, pad_id
        self.wall_s = 0.0
        self.calls = 0
        self.sequences = 0
        self.generated_positions = 0  # sequences x new positions produced by generate (what was computed)
        self.response_tokens = 0  # tokens up to and including the first stop token (what the reward sees)
        self.ended = 0
        self._inner = model.generate
        model.generate = self  # instance attribute shadows the method; TRL calls unwrapped.policy.generate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        t0 = time.perf_counter()
        out = self._inner(*args, **kwargs)
        self.wall_s += time.perf_counter() - t0
        ctx = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
        seqs = out.sequences if hasattr(out, "sequences") else out
        new = seqs[:, ctx:]
        self.calls += 1
        self.sequences += new.shape[0]
        self.generated_positions += new.numel()
        if self.stop_id is not None and new.shape[1] > 0:
            is_stop = new == self.stop_id
            has = is_stop.any(1)
            first = torch.where(
                has, is_stop.float().argmax(1) + 1, torch.full_like(has, new.shape[1], dtype=torch.long)
            )
            self.response_tokens += int(first.sum())
            self.ended += int(has.sum())
        else:
            self.response_tokens += new.numel()
        return out


def _slope(ys: list[float]) -> float | None:
    """Least-squares slope of ys against 1..n (None for fewer than 2 finite points)."""
    pts = [(i + 1, y) for i, y in enumerate(ys) if y is not None and math.isfinite(y)]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)

    import accelerate
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if trl.__version__ != "1.12.0":
        print(
            f"warning: trl {trl.__version__} is not the 1.12.0 of issue #6 (make bench-env gives .venv-bench with it)",
            file=sys.stderr,
        )
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    datasets.disable_progress_bars()
    torch.manual_seed(a.seed)

    t_load = time.perf_counter()
    for d in (a.policy, a.reward):
        if not (Path(d) / "config.json").is_file():
            raise SystemExit(f"{d}: no config.json (not a Hugging Face model dir)")
    tokenizer = AutoTokenizer.from_pretrained(a.policy)
    if not tokenizer.chat_template:
        raise SystemExit(f"{a.policy}: the tokenizer has no chat template")
    if tokenizer.pad_token_id is None:
        raise SystemExit(f"{a.policy}: the tokenizer has no pad token (TRL pads queries and responses with it)")
    tokenizer.padding_side = "left"  # TRL generates from left-padded queries
    vocab = tokenizer.get_vocab()
    if STOP_TOKEN in vocab:
        stop_id, stop_token = vocab[STOP_TOKEN], STOP_TOKEN
    elif tokenizer.eos_token_id is not None:
        stop_id, stop_token = tokenizer.eos_token_id, tokenizer.eos_token
    else:
        raise SystemExit(f"{a.policy}: the tokenizer has neither {STOP_TOKEN} nor an eos token")
    eos_set_to_stop = tokenizer.eos_token_id != stop_id
    if eos_set_to_stop:
        tokenizer.eos_token = stop_token

    policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    ref_policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=torch.float32)
    for m in (ref_policy, reward_model):
        m.requires_grad_(False)
        m.eval()

    reward_stats = None
    if a.normalize_reward:
        stats_path = Path(a.reward) / "reward_stats.json"
        if not stats_path.is_file():
            raise SystemExit(f"--normalize-reward: {stats_path} missing")
        reward_stats = json.loads(stats_path.read_text())
        mean, std = float(reward_stats["mean"]), float(reward_stats["std"])
        if not std > 0:
            raise SystemExit(f"{stats_path}: std must be > 0, got {std}")
        head = reward_model.score

        class _Normalised(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.head = head

            def forward(self, h: torch.Tensor) -> torch.Tensor:
                return (self.head(h) - mean) / std

        reward_model.score = _Normalised()  # TRL's get_reward calls model.score(hidden_states[-1])

    prompts = read_prompts(a.prompts)
    if len(prompts) < a.batch:
        raise SystemExit(f"{a.prompts}: {len(prompts)} prompts < --batch {a.batch} (TRL drops incomplete batches)")
    train_dataset = datasets.Dataset.from_dict({"input_ids": [chat_ids(tokenizer, p) for p in prompts]})
    prompt_lengths = [len(x) for x in train_dataset["input_ids"]]
    load_s = time.perf_counter() - t_load

    tmp = tempfile.TemporaryDirectory(prefix="trl_ppo_ref_")
    config = PPOConfig(
        output_dir=tmp.name,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=a.seed,
        learning_rate=a.lr,
        lr_scheduler_type=a.lr_scheduler,
        max_grad_norm=a.max_grad_norm,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        num_mini_batches=a.mini_batches,
        num_ppo_epochs=a.ppo_epochs,
        total_episodes=a.steps * a.batch,
        local_rollout_forward_batch_size=a.rollout_batch or a.batch,
        num_sample_generations=0,
        response_length=a.response_length,
        stop_token_id=stop_id,
        temperature=a.temperature,
        kl_coef=a.kl_coef,
        kl_estimator=a.kl_estimator,
        cliprange=a.cliprange,
        cliprange_value=a.cliprange_value,
        vf_coef=a.vf_coef,
        gamma=a.gamma,
        lam=a.lam,
        whiten_rewards=a.whiten_rewards,
        missing_eos_penalty=a.missing_eos_penalty,
        bf16=False,
        fp16=False,
    )

    step_logs: list[dict[str, Any]] = []
    clock: dict[str, float] = {}

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            clock["start"] = clock["last"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001, ANN003, ANN201
            now = time.perf_counter()
            if logs and "objective/scores" in logs:
                rec = {"step": len(step_logs) + 1, "time_s": now - clock["start"], "step_s": now - clock["last"]}
                rec.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
                step_logs.append(rec)
                clock["last"] = now

    t_setup = time.perf_counter()
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        train_dataset=train_dataset,
        value_model=value_model,
        callbacks=[Recorder()],
    )
    setup_s = time.perf_counter() - t_setup
    trainer.remove_callback(PrinterCallback)  # per-step dicts go to the JSON, not stdout
    meter = GenerationMeter(
        trainer.model.policy if hasattr(trainer.model, "policy") else policy, stop_id, tokenizer.pad_token_id
    )

    t0 = time.perf_counter()
    trainer.train()
    train_wall_s = time.perf_counter() - t0

    n_prompts = a.steps * a.batch
    steady = [r["step_s"] for r in step_logs[1:]]
    scores = [r.get("objective/scores") for r in step_logs]
    result = {
        "implementation": "trl.experimental.ppo.PPOTrainer",
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "accelerate": accelerate.__version__,
            "python": platform.python_version(),
        },
        "command": [sys.executable, *sys.argv],
        "args": vars(a),
        "torch_threads": torch.get_num_threads(),
        "device": str(trainer.accelerator.device),
        "stop_token": stop_token,
        "stop_token_id": stop_id,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_set_to_stop": eos_set_to_stop,
        "reward_stats": reward_stats,
        "n_dataset_prompts": len(prompts),
        "prompt_tokens": {
            "min": min(prompt_lengths),
            "max": max(prompt_lengths),
            "mean": sum(prompt_lengths) / len(prompt_lengths),
        },
        "trl_config": {
            k: getattr(trainer.args, k)
            for k in (
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "world_size",
                "batch_size",
                "local_batch_size",
                "num_mini_batches",
                "mini_batch_size",
                "num_ppo_epochs",
                "total_episodes",
                "num_total_batches",
                "local_rollout_forward_batch_size",
                "response_length",
                "stop_token_id",
                "temperature",
                "kl_coef",
                "kl_estimator",
                "cliprange",
                "cliprange_value",
                "vf_coef",
                "gamma",
                "lam",
                "whiten_rewards",
                "missing_eos_penalty",
                "learning_rate",
                "lr_scheduler_type",
                "optim",
                "adam_epsilon",
                "weight_decay",
                "seed",
            )
        },
        "optimizer_steps_per_ppo_step": a.ppo_epochs * a.mini_batches,
        "load_s": load_s,
        "setup_s": setup_s,
        "train_wall_s": train_wall_s,
        "prompts": n_prompts,
        "prompts_per_s": n_prompts / train_wall_s,
        "prompts_per_s_after_first_step": (a.batch * len(steady) / sum(steady)) if steady else None,
        "generation": {
            "wall_s": meter.wall_s,
            "fraction_of_train": meter.wall_s / train_wall_s,
            "calls": meter.calls,
            "sequences": meter.sequences,
            "generated_positions": meter.generated_positions,
            "response_tokens": meter.response_tokens,
            "fraction_ended": (meter.ended / meter.sequences) if meter.sequences and stop_id is not None else None,
            "generated_tokens_per_s": meter.generated_positions / meter.wall_s if meter.wall_s else None,
            "response_tokens_per_s_end_to_end": meter.response_tokens / train_wall_s,
        },
        "score_first": scores[0] if scores else None,
        "score_last": scores[-1] if scores else None,
        "score_slope_per_step": _slope(scores),
        "steps": step_logs,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    tmp.cleanup()
    summary = {k: result[k] for k in ("train_wall_s", "prompts", "prompts_per_s", "score_first", "score_last")}
    summary["generated_tokens_per_s"] = result["generation"]["generated_tokens_per_s"]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
