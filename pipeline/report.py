"""The run report: runs/<run>/report.md with PNG plots, from the stages' metrics.jsonl and manifests.

    python -m pipeline report --config configs/tiny.yaml      (make report)

Plots (runs/<run>/report/*.png): pretrain train/val loss; SFT loss and held-out answer accuracy; reward-model
accuracy and the held-out reward distributions of chosen vs rejected responses (``eval_rewards`` in the
reward manifest); PPO reward, KL, entropy and response length. Tables: each stage's state, wall time,
throughput and key metrics, greedy answers of the pretrain, SFT and PPO models to the same held-out
prompts (generated here, so the three columns are comparable; ``samples=False`` skips loading models), the quality
bar (with the reward stage's gate before PPO), and PPO against the strongest control
(``pipeline/analysis/controls.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .analysis.agreement import format_markdown, format_pairs, markdown_cell
from .analysis.best_of_k import format_best_of_k
from .analysis.controls import controls_verdict, format_controls, reward_gate
from .config import ReportConfig, RunConfig
from .data.tasks import generate_tasks
from .lm import generate_responses
from .plots import PLOTS, plot_stage
from .runs import KEY_METRICS, STAGES, StageDir
from .status import format_value, run_status

__all__ = ["PLOTS", "write_report", "plot_stage", "sample_answers"]

log = logging.getLogger(__name__)

_THROUGHPUT = ("tokens_per_s", "rollout_tokens_per_s", "prompts_per_s", "samples_per_s")


def _held_out_prompts(cfg: RunConfig, manifests: dict[str, dict[str, Any]], n: int) -> list[str]:
    for stage in ("ppo", "sft"):
        prompts = [
            s["prompt"] for s in manifests.get(stage, {}).get("samples", []) if isinstance(s, dict) and s.get("prompt")
        ]
        if prompts:
            return prompts[:n]
    return [r["prompt"] for r in generate_tasks(cfg.data.tasks).ppo_eval[:n]]


def sample_answers(
    cfg: RunConfig, manifests: dict[str, dict[str, Any]], n: int = 5, max_new_tokens: int = 48
) -> dict[str, Any]:
    """Greedy answers of each done model stage (pretrain, sft, ppo) to the same ``n`` held-out prompts.

    Returns:
        ``{"prompts": [...], "answers": {stage: [...]}}``.
    """
    prompts = _held_out_prompts(cfg, manifests, n)
    answers = {}
    for stage in ("pretrain", "sft", "ppo"):
        d = StageDir.of(cfg.run_dir, stage).artifact
        if stage not in manifests or not d.is_dir():
            continue
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(d)
        answers[stage] = generate_responses(model, tok, prompts, max_new_tokens=max_new_tokens, do_sample=False)
    return {"prompts": prompts, "answers": answers}


def _throughput(manifest: dict[str, Any]) -> str:
    m = manifest.get("metrics", {})
    found = [
        f"{format_value(m[k])} {k.removesuffix('_per_s').replace('_', ' ')}/s"
        for k in _THROUGHPUT
        if isinstance(m.get(k), (int, float))
    ]
    if found:
        return ", ".join(found)
    steps, wall = m.get("steps"), manifest.get("wall_time_s")
    return f"{steps / wall:.3g} steps/s" if isinstance(steps, (int, float)) and wall else "-"


def _mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _gate_row(reward_manifest: dict[str, Any], bar: ReportConfig) -> tuple[str, str, bool] | None:
    """The quality bar's row for the gate before PPO, judged with ``bar``'s thresholds (None without a checker)."""
    gate = reward_gate(reward_manifest.get("best_of_k"), bar.gate_min_best_of_k_gain, bar.gate_min_right_wrong_auc)
    if gate is None:
        return None
    auc = "-" if gate["right_wrong_auc"] is None else f"{gate['right_wrong_auc']:.3f}"
    name = (f"reward: gate before PPO: best of {gate['k']} >= greedy + {bar.gate_min_best_of_k_gain * 100:g} points "
            f"and right-vs-wrong AUC >= {bar.gate_min_right_wrong_auc:g}")  # fmt: skip
    return name, f"{gate['best_of_k_gain'] * 100:+.1f} points, AUC {auc}", gate["passed"]


def quality_lines(
    manifests: dict[str, dict[str, Any]], total_wall_s: float, bar: ReportConfig | None = None
) -> list[str]:
    """The quality-bar checklist and the reward-model-vs-checker section; empty when no stage has a checker.

    The bar's thresholds are ``bar`` (the ``report:`` config section; None: its defaults): whole run time,
    held-out pair accuracy, the gate before PPO, PPO's checker-accuracy gain over SFT; besides, SFT above the
    pretrained model, PPO above the strongest control, reward up and KL within ``ppo.kl_target``. The controls table
    and its verdict follow the checklist.
    """
    sft = manifests.get("sft", {}).get("metrics", {})
    rw = manifests.get("reward", {}).get("metrics", {})
    ppo_manifest = manifests.get("ppo", {})
    ppo = ppo_manifest.get("metrics", {})
    if sft.get("checker_accuracy") is None and ppo.get("checker_accuracy") is None:
        return []
    bar = bar or ReportConfig()
    rows = []
    if all(s in manifests for s in STAGES):
        rows.append((f"whole run <= {bar.max_wall_time_s / 60:g} min", f"{total_wall_s:.0f} s",
                     total_wall_s <= bar.max_wall_time_s))  # fmt: skip
    if sft.get("checker_accuracy") is not None and sft.get("pretrain_checker_accuracy") is not None:
        a, b = sft["checker_accuracy"], sft["pretrain_checker_accuracy"]
        rows.append(("SFT: checker accuracy above the pretrained model's", f"{b:.3f} -> {a:.3f}", a > b))
    if rw.get("pair_accuracy") is not None:
        rows.append((f"reward: held-out pair accuracy >= {bar.min_reward_pair_accuracy:g}", f"{rw['pair_accuracy']:.3f}",
                     rw["pair_accuracy"] >= bar.min_reward_pair_accuracy))  # fmt: skip
    if (gate_row := _gate_row(manifests.get("reward", {}), bar)) is not None:
        rows.append(gate_row)
    if ppo.get("checker_accuracy") is not None and ppo.get("sft_checker_accuracy") is not None:
        a, b = ppo["checker_accuracy"], ppo["sft_checker_accuracy"]
        rows.append((f"PPO: checker accuracy >= SFT's + {bar.min_ppo_accuracy_gain * 100:g} points",
                     f"{b:.3f} -> {a:.3f} ({(a - b) * 100:+.1f})",
                     a - b >= bar.min_ppo_accuracy_gain - 1e-9))  # fmt: skip
    verdict = controls_verdict(ppo, rw)
    decided = verdict["outcome"] in ("ppo_wins", "control_wins", "not_distinguishable")
    if decided:
        rows.append((f"PPO: above the strongest control ({verdict['strongest']}), non-overlapping 95% intervals",
                     verdict["outcome"].replace("_", " "), verdict["outcome"] == "ppo_wins"))  # fmt: skip
    if ppo.get("reward_mean") is not None and ppo.get("sft_reward_mean") is not None:
        rows.append(("PPO: mean held-out reward up", f"{ppo['sft_reward_mean']:.3f} -> {ppo['reward_mean']:.3f}",
                     ppo["reward_mean"] > ppo["sft_reward_mean"]))  # fmt: skip
    target = (ppo_manifest.get("config") or {}).get("ppo", {}).get("kl_target")
    if ppo.get("kl") is not None and isinstance(target, (int, float)):
        rows.append(("PPO: KL to the reference within ppo.kl_target", f"{ppo['kl']:.3f} (target {target:g})",
                     ppo["kl"] <= target))  # fmt: skip
    lines = ["## Quality bar (held-out prompts, task checker)", "", "| check | value | |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {_mark(ok)} |" for name, value, ok in rows]
    lines.append("")
    if decided:
        lines += ["## PPO against the controls (held-out prompts, task checker)", "", *format_controls(verdict), ""]
    by_kind = manifests.get("reward", {}).get("pair_accuracy_by_kind")
    bok = manifests.get("reward", {}).get("best_of_k")
    summary = ppo_manifest.get("rm_vs_checker")
    if by_kind or bok or summary:
        lines += ["## Reward model vs checker", ""]
    if by_kind:
        lines += [
            "Held-out ranked responses: the reward model's pair accuracy by task and by kind of pair, the kinds "
            "given by the checker (right answer, near miss = well formed but wrong, malformed); (n) pairs.",
            "",
            *format_pairs(by_kind),
            "",
        ]
    if bok:
        lines += [
            f"Before PPO: the SFT model's answers to held-out prompts of the reward data, greedy and {bok['k']} "
            "samples each; the checker's accuracy of the greedy answer, of the samples, of any sample (pass@k), "
            "and of the sample the reward model scores highest. PPO moves the policy toward what the reward model "
            "prefers: when its best-of-k is not above greedy accuracy, PPO has no gain the reward model can see "
            "(a margin above greedy is needed, not sufficient: bench/RESULTS.md).",
            "",
            *format_best_of_k(bok["tasks"], bok["k"]),
            "",
        ]
    if summary:
        lines += format_markdown(summary)
    return lines


def write_report(cfg: RunConfig, samples: bool = True, n_samples: int = 5) -> Path:
    """Write runs/<run>/report.md and its plots; returns the report's path."""
    run_dir = cfg.run_dir
    manifests = {s: m for s in STAGES if (m := StageDir.of(run_dir, s).manifest()) is not None}
    lines = [f"# Run report: {cfg.run.name}", "", f"Run folder `{run_dir}`.", "", "## Stages", ""]
    lines += ["| stage | state | wall time | throughput | key metrics |", "|---|---|---|---|---|"]
    total = 0.0
    for st in run_status(cfg):
        m = manifests.get(st.stage, {})
        wall = m.get("wall_time_s")
        total += wall or 0.0
        keys = KEY_METRICS.get(st.stage, ())
        metrics = ", ".join(f"{k}={format_value(m['metrics'][k])}" for k in keys if k in m.get("metrics", {})) or "-"
        state = st.state + (f" (step {st.step} of {st.max_steps or '?'})" if st.state == "partial" else "")
        lines.append(
            f"| {st.stage} | {state} | {f'{wall:.1f} s' if wall else '-'} | {_throughput(m) if m else '-'} | {metrics} |"
        )
    lines += ["", f"Total wall time of done stages: {total:.1f} s.", ""]

    plots = run_dir / "report"
    lines += ["## Curves", ""]
    for stage in PLOTS:
        records = StageDir.of(run_dir, stage).read_metrics()
        if plot_stage(stage, records, plots / f"{stage}.png", manifests.get(stage)):
            lines += [f"### {stage}", "", f"![{stage}](report/{stage}.png)", ""]

    if samples and any(s in manifests for s in ("pretrain", "sft", "ppo")):
        got = sample_answers(cfg, manifests, n_samples)
        stages = list(got["answers"])
        lines += ["## Sample answers (greedy, held-out prompts)", ""]
        lines += ["| prompt | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
        for i, p in enumerate(got["prompts"]):
            lines.append(
                f"| {markdown_cell(p)} | " + " | ".join(markdown_cell(got["answers"][s][i]) for s in stages) + " |"
            )
        lines.append("")
    lines += quality_lines(manifests, total, cfg.report)
    if "export" in manifests:
        exp = manifests["export"]
        checks = ", ".join(
            f"transformers {c.get('transformers')}: {'ok' if c.get('ok') else 'FAILED'}"
            for c in exp.get("verification", [])
        )
        lines += ["## Export", "", f"`{exp.get('artifact')}` ({checks}; max |logit diff| "
                  f"{format_value(exp['metrics'].get('max_abs_logit_diff'))}).", ""]  # fmt: skip
    path = run_dir / "report.md"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    log.info("report: %s", path)
    return path
