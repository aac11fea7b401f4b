"""PPO throughput, end to end: prompts/s and rollout tokens/s of one PPO step (rollout + 4 epochs of updates).

Runs our ``pipeline.rl.trainer.PPOTrainer`` and, for comparison, TRL 1.12's ``trl.experimental.ppo.PPOTrainer``
(in its own venv) on the same models, prompts, batch sizes and generation length, one after the other, and
appends a row to bench/RESULTS.md::

    .venv/bin/python bench/make_ppo_bench_fixtures.py --out runs/trlbench        # tiny models + prompts
    make bench-env                                                                # TRL 1.12 in .venv-bench
    .venv/bin/python bench/ppo_throughput.py --fixtures runs/trlbench --trl-python .venv-bench/bin/python
    .venv/bin/python bench/ppo_throughput.py --config configs/tiny.yaml          # ours only, the run's sft/reward

Each implementation runs ``--warmup`` steps, then ``--steps`` timed steps; prompts/s = timed prompts / timed
wall time. Both use the same settings: ``ppo.rollout_batch_size`` responses per step (one per prompt), minibatches of
``ppo.minibatch_size``, ``ppo.ppo_epochs`` epochs, ``ppo.max_new_tokens`` sampled tokens (temperature 1,
no top-k/top-p), fp32, ``--threads`` torch threads. ``--impl ours|trl`` runs one side only (the TRL side
imports nothing from ``pipeline``, so it runs in TRL's venv).

Each side also reports its seconds per step by phase, measured the same way: generation (our ``sample``, TRL's
``batch_generation``), scoring (the forwards under ``no_grad`` after generation: our value, reference and reward
model, with the policy's old log-probs taken from the sampling, or a policy forward where Hugging Face's
``generate`` sampled; TRL's reference, value and reward model), and training (the rest of the step: advantages and
the PPO epochs).

``--repeats`` alternates the two sides (ours, then TRL) and reports the ratio of the medians and each pair's ratio
with their median: a small VM's speed drifts by 20-40% over minutes, and a pair that ran back to back is less
exposed to it than two medians that may come from different spells. Each repeat line shows the 1-minute load
average first, so that another job on the machine is visible.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _prompts(fixtures: Path, tokenizer, n: int) -> list[list[int]]:
    records = [json.loads(line) for line in (fixtures / "prompts.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for rec in records[:n]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": rec["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


# ----------------------------------------------------------------------------- ours


def run_ours(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_config
    from pipeline.rl.components import load_models, load_reward_stats, render_prompts
    from pipeline.rl.trainer import PPOTrainer
    from pipeline.training import make_accelerator

    torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.fixtures:
        overrides += [f"ppo.policy_from={args.fixtures}/policy", f"ppo.reward_from={args.fixtures}/reward"]
    cfg = load_config(args.config, overrides)
    c = cfg.ppo
    policy_from = c.policy_from or cfg.run_dir / "sft" / "artifact"
    reward_from = c.reward_from or cfg.run_dir / "reward" / "artifact"
    m = load_models(policy_from, reward_from, critic=c.advantage != "group")
    if args.fixtures:
        prompts = _prompts(Path(args.fixtures), m.tokenizer, 100_000)
    else:
        from pipeline.data.prompts import load_prompts

        prompts = render_prompts(m.tokenizer, load_prompts(c.dataset, cfg.data.tasks, 0).train, c.max_prompt_length)
    torch.manual_seed(0)
    tr = PPOTrainer(
        c,
        make_accelerator(),
        m.policy,
        m.value_model,
        m.ref_model,
        m.scorer,
        m.stop_ids,
        m.pad_id,
        reward_stats=load_reward_stats(reward_from),
        seed=0,
    )
    clock = PhaseClock()
    tr.sample = clock.wrap("generation", tr.sample)
    tr.rollout = clock.wrap("rollout", tr.rollout)
    order = list(range(len(prompts)))
    times, tokens = [], 0
    for step in range(args.warmup + args.steps):
        q, qm = tr._prompt_batch(prompts, order)
        if step == args.warmup:
            clock.reset()
        t0 = time.perf_counter()
        stats = tr.train_step(q, qm)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens += stats["response_length"] * c.rollout_batch_size
    wall = sum(times)
    phases = clock.per_step(args.steps)
    # the rollout is generation + scoring (the value, reference and reward forwards)
    phases["scoring"] = phases.pop("rollout") - phases["generation"]
    return {
        "impl": "ours",
        "prompts_per_s": args.steps * c.prompts_per_step / wall,
        "rollout_tokens_per_s": tokens / wall,
        "step_s": wall / args.steps,
        "response_length": tokens / (args.steps * c.rollout_batch_size),
        "phases_s": _phases(phases, wall / args.steps),
        "settings": _settings(c),
    }


class PhaseClock:
    """Seconds spent inside wrapped functions, by phase (a call nested in another phase's call counts in both)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def wrap(self, phase: str, fn, when=None):
        self.seconds.setdefault(phase, 0.0)

        def timed(*a, **kw):
            if when is not None and not when():
                return fn(*a, **kw)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[phase] += time.perf_counter() - t0

        return timed

    def per_step(self, steps: int) -> dict[str, float]:
        return {k: v / steps for k, v in self.seconds.items()}


def _phases(phases: dict[str, float], step_s: float) -> dict[str, float]:
    """Seconds per step in generation, scoring, and training: the rest of the step (advantages, the PPO epochs'
    forward/backward/optimizer steps, statistics), measured the same way on both sides."""
    return {
        "generation": phases["generation"],
        "scoring": phases["scoring"],
        "training": step_s - phases["generation"] - phases["scoring"],
    }


def _format_phases(result: dict) -> str:
    p, step = result["phases_s"], result["step_s"]
    return f"step {step:.3f}: " + ", ".join(f"{k} {v:.3f} ({v / step:.0%})" for k, v in p.items())


def _settings(c) -> dict:
    return {
        "rollout_batch_size": c.rollout_batch_size,
        "minibatch_size": c.minibatch_size,
        "ppo_epochs": c.ppo_epochs,
        "max_new_tokens": c.max_new_tokens,
    }


# ----------------------------------------------------------------------------- TRL 1.12


def run_trl(args: argparse.Namespace, settings: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    torch.set_num_threads(args.threads)
    # phases: generation (batch_generation), scoring (the reference, value and reward forwards under no_grad);
    # training is the rest of the step up to its last optimizer step (every forward/backward with gradients)
    phase_clock = PhaseClock()
    trl_ppo.batch_generation = phase_clock.wrap("generation", trl_ppo.batch_generation)
    no_grad = lambda: not torch.is_grad_enabled()  # noqa: E731
    trl_ppo.forward = phase_clock.wrap("scoring", trl_ppo.forward, when=no_grad)
    trl_ppo.get_reward = phase_clock.wrap("scoring", trl_ppo.get_reward, when=no_grad)
    fx = Path(args.fixtures)
    tok = AutoTokenizer.from_pretrained(fx / "policy")
    tok.padding_side = "left"
    prompts = _prompts(fx, tok, 100_000)
    ds = Dataset.from_dict({"input_ids": prompts})
    B, mb = settings["rollout_batch_size"], settings["minibatch_size"]
    n_steps = args.warmup + args.steps

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ticks: list[float] = []
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.ticks.append(time.perf_counter())
            if len(self.ticks) == args.warmup:
                phase_clock.reset()

    clock = Clock()
    out = tempfile.mkdtemp()
    config = PPOConfig(
        output_dir=out,
        per_device_train_batch_size=B,
        gradient_accumulation_steps=1,
        num_mini_batches=B // mb,
        num_ppo_epochs=settings["ppo_epochs"],
        response_length=settings["max_new_tokens"],
        local_rollout_forward_batch_size=B,
        total_episodes=n_steps * B,
        temperature=1.0,
        kl_coef=0.05,
        missing_eos_penalty=1.0,
        stop_token_id=tok.convert_tokens_to_ids("<|end|>"),
        num_sample_generations=0,
        learning_rate=1e-5,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        bf16=False,
        fp16=False,
    )
    policy = AutoModelForCausalLM.from_pretrained(fx / "policy")
    ref = AutoModelForCausalLM.from_pretrained(fx / "policy")
    value = AutoModelForSequenceClassification.from_pretrained(fx / "reward", num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(fx / "reward", num_labels=1)
    trainer = PPOTrainer(
        args=config,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=ds,
        eval_dataset=ds.select(range(8)),
        callbacks=[clock],
    )
    trainer.train()
    ticks = clock.ticks
    if len(ticks) < n_steps:
        raise RuntimeError(f"TRL reported {len(ticks)} steps, expected {n_steps}")
    wall = ticks[-1] - ticks[args.warmup - 1] if args.warmup else ticks[-1] - clock.t0
    phases = phase_clock.per_step(args.steps)
    return {
        "impl": f"trl {trl.__version__}",
        "prompts_per_s": args.steps * B / wall,
        "step_s": wall / args.steps,
        "phases_s": _phases(phases, wall / args.steps),
        "settings": settings,
    }


# ----------------------------------------------------------------------------- driver


def _run_side(python: str, impl: str, args: argparse.Namespace, settings: dict | None = None) -> dict:
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--impl",
        impl,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    if args.fixtures:
        cmd += ["--fixtures", args.fixtures]
    if args.config:
        cmd += ["--config", args.config]
    if settings:
        cmd += ["--settings", json.dumps(settings)]
    cmd += list(args.overrides)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(results: list[dict]) -> dict:
    """The run with the median prompts/s."""
    ranked = sorted(results, key=lambda r: r["prompts_per_s"])
    return ranked[len(ranked) // 2]


def _append_results(
    cmdline: str, ours: dict, trl_result: dict | None, repeats: int, pairs: list[float] | None = None
) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    header = "## PPO throughput (`bench/ppo_throughput.py`)"
    if header not in text:
        text = text.rstrip("\n") + (
            f"\n\n{header}\n\n"
            "One PPO step = rollout (KV-cache sampling, policy/value/reference/reward scoring) + the PPO epochs of\n"
            "minibatch updates. prompts/s = prompts per timed step / step wall time, after warm-up steps; tokens/s\n"
            "counts sampled response tokens. The TRL column is TRL 1.12's `trl.experimental.ppo.PPOTrainer` in its\n"
            "own venv on the same models, prompts, batch sizes, epochs and generation length.\n\n"
            "| date | machine | command | settings | ours prompts/s | ours rollout tok/s | TRL prompts/s | speed-up |\n"
            "|---|---|---|---|---|---|---|---|\n"
        )
    s = ours["settings"]
    settings = (
        f"B={s['rollout_batch_size']} mb={s['minibatch_size']} epochs={s['ppo_epochs']} new={s['max_new_tokens']}"
        f"; median of {repeats} alternating runs"
    )
    trl_ps = f"{trl_result['prompts_per_s']:.1f}" if trl_result else "-"
    speed = f"{ours['prompts_per_s'] / trl_result['prompts_per_s']:.2f}x" if trl_result else "-"
    if trl_result and pairs:
        speed += f" (per pair: median {statistics.median(pairs):.2f}x, {pairs[0]:.2f}-{pairs[-1]:.2f})"
    machine = f"{platform.machine()} {os.cpu_count()} cores"
    row = (
        f"| {dt.date.today()} | {machine} | `{cmdline}` | {settings} | {ours['prompts_per_s']:.1f} | "
        f"{ours['rollout_tokens_per_s']:.0f} | {trl_ps} | {speed} |\n"
    )
    # rows go right under this table's header (the table is followed by other sections or the end)
    lines = text.splitlines(keepends=True)
    at = next(i for i, ln in enumerate(lines) if ln.startswith(header))
    end = at + 1
    while end < len(lines) and not lines[end].startswith("|"):
        end += 1
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines.insert(end, row)
    path.write_text("".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description="PPO throughput: ours vs TRL 1.12 (see the module docstring)")
    p.add_argument("--config", default=None, help="run YAML whose ppo section sets the batch/generation sizes")
    p.add_argument("--fixtures", default=None, help="dir from bench/make_ppo_bench_fixtures.py")
    p.add_argument("--trl-python", default=None, help="python of a venv with trl==1.12.0 (compare against it)")
    p.add_argument("--impl", choices=["both", "ours", "trl"], default="both")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; medians are reported")
    p.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-append", action="store_true", help="do not write bench/RESULTS.md")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides (ours), e.g. ppo.max_new_tokens=32")
    args = p.parse_args()
    if args.impl == "ours":
        print(json.dumps(run_ours(args)))
        return
    if args.impl == "trl":
        print(json.dumps(run_trl(args, json.loads(args.settings))))
        return
    if args.trl_python and not args.fixtures:
        raise SystemExit("--trl-python needs --fixtures (TRL loads the same models and prompts from there)")
    if args.trl_python and any(o.replace(" ", "") == "ppo.advantage=group" for o in args.overrides):
        raise SystemExit(
            "ppo.advantage=group has no critic and several samples per prompt: not TRL's PPO; use --impl ours"
        )
    # alternate ours / TRL so that both see the same machine load; report the median of each
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for i in range(args.repeats):
        load = os.getloadavg()[0]  # another job on the machine shows here (the runs themselves use the cores)
        runs["ours"].append(_run_side(sys.executable, "ours", args))
        line = f"[{i + 1}/{args.repeats}] load {load:.2f}: ours {runs['ours'][-1]['prompts_per_s']:.1f} prompts/s"
        if args.trl_python:
            runs["trl"].append(_run_side(args.trl_python, "trl", args, runs["ours"][-1]["settings"]))
            line += f", TRL {runs['trl'][-1]['prompts_per_s']:.1f} prompts/s"
        print(line, flush=True)
    ours = _median(runs["ours"])
    trl_result = _median(runs["trl"]) if runs["trl"] else None
    # each pair ran back to back, so its ratio is less exposed to the machine's slower and faster spells than the
    # ratio of the two medians, which may come from different spells
    pairs = sorted(o["prompts_per_s"] / t["prompts_per_s"] for o, t in zip(runs["ours"], runs["trl"]))
    print(f"ours: {ours['prompts_per_s']:.1f} prompts/s, {ours['rollout_tokens_per_s']:.0f} rollout tokens/s (median)")
    for side, results in runs.items():
        if results:
            print(f"{side} seconds per step (median run's): {_format_phases(_median(results))}")
    if trl_result:
        print(
            f"TRL:  {trl_result['prompts_per_s']:.1f} prompts/s -> {ours['prompts_per_s'] / trl_result['prompts_per_s']:.2f}x"
        )
        print(f"per-pair ratios: {', '.join(f'{r:.2f}' for r in pairs)} (median {statistics.median(pairs):.2f}x)")
    if not args.no_append:
        cmdline = "python bench/ppo_throughput.py " + " ".join(sys.argv[1:])
        _append_results(cmdline, ours, trl_result, args.repeats, pairs)


if __name__ == "__main__":
    main()
