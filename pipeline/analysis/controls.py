"""Controls: does PPO beat the cheaper ways to the same answers, and should PPO run at all?

DESIGN.md: a stage's gain counts only against the strongest control. The controls, each a checker accuracy with
its 95% Wilson interval (:func:`pipeline.analysis.checker.wilson_ci95`):

- **SFT greedy**: the SFT model's greedy answers to PPO's held-out prompts (PPO manifest ``sft_checker_accuracy``);
- **the reward model's best of k**: the SFT model's ``k`` samples per prompt, the one the reward model scores
  highest (reward manifest ``best_of_8_accuracy``; ``best_of_{k}_accuracy`` when ``reward.best_of_k`` is not 8).
  It is measured on the held-out prompts of the reward data, which may differ from PPO's held-out prompts;
- **the DPO policy**: with a DPO (implicit) reward, the DPO-trained LM itself answering PPO's held-out prompts
  greedily (PPO manifest ``dpo_policy_checker_accuracy``).

:func:`controls_verdict` names the strongest and says whether PPO is above every control with non-overlapping
intervals, below one of them (a cheaper path wins), or not distinguishable. :func:`reward_gate` is the check
before PPO: the reward model's best of k must be far enough above greedy decoding, and it must rank a right
sample above a wrong one often enough, or PPO has little gain the reward model can see. Tables only (no torch).

    metrics, gate = reward_check(manifest["best_of_k"], min_gain=0.15, min_auc=0.90)
    verdict = controls_verdict(ppo_manifest["metrics"], reward_manifest["metrics"])
"""

from __future__ import annotations

import logging
import re
from typing import Any

from .checker import percent, wilson_ci95

__all__ = [
    "best_of_k_key",
    "best_of_k_metrics",
    "judge_gate",
    "reward_gate",
    "reward_check",
    "gate_warning",
    "controls_verdict",
    "format_controls",
]

log = logging.getLogger(__name__)

SFT, DPO = "SFT model (greedy)", "DPO policy"
_BEST_OF = re.compile(r"^best_of_(\d+)_accuracy$")
_EPS = 1e-9  # thresholds compare with this slack, so a value printed equal to its threshold meets it


def _ci(ci: list[float] | None) -> str:
    return "-" if not ci else f"[{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]"


def best_of_k_key(k: int) -> str:
    """The reward manifest's key of the best-of-k accuracy: ``best_of_8_accuracy`` for ``k`` = 8 (DESIGN.md's
    fixed name), ``best_of_{k}_accuracy`` otherwise, so the key always says how many samples the pick had."""
    return f"best_of_{k}_accuracy"


def _all_row(best_of_k: dict[str, Any] | None) -> tuple[int, dict[str, Any]] | None:
    """``(k, the all row)`` of a best-of-k check (``{"k", "tasks"}``); None without one."""
    row = ((best_of_k or {}).get("tasks") or {}).get("all")
    return (int(best_of_k["k"]), row) if best_of_k and row else None


def best_of_k_metrics(best_of_k: dict[str, Any] | None) -> dict[str, Any]:
    """The reward manifest's metrics from the ``all`` row of its best-of-k check (``{"k", "tasks"}``, as
    :func:`pipeline.analysis.diagnostics.reward_diagnostics` writes it); empty without the check.

    Returns:
        ``greedy_accuracy`` (row ``greedy``), ``best_of_{k}_accuracy`` (row ``rm_best_of_k``), ``right_wrong_auc``
        (row ``rm_auc``), the two accuracies' ``_ci95`` (Wilson on the row's ``n`` prompts) and ``best_of_k_n``.
    """
    if (found := _all_row(best_of_k)) is None:
        return {}
    k, row = found
    n, key = int(row["n"]), best_of_k_key(k)
    return {
        "greedy_accuracy": row["greedy"],
        "greedy_accuracy_ci95": wilson_ci95(round(row["greedy"] * n), n),
        key: row["rm_best_of_k"],
        f"{key}_ci95": wilson_ci95(round(row["rm_best_of_k"] * n), n),
        "right_wrong_auc": row["rm_auc"],
        "best_of_k_n": n,
    }


def judge_gate(gain: float, auc: float | None, min_gain: float, min_auc: float, k: int = 8) -> dict[str, Any]:
    """The gate before PPO on given numbers: ``gain`` (best of ``k`` minus greedy accuracy) at least ``min_gain``
    and the right-vs-wrong ``auc`` at least ``min_auc`` (None, no prompt with both a right and a wrong sample:
    failed).

    >>> judge_gate(0.2, 0.95, 0.15, 0.9)["passed"], judge_gate(0.2, 0.85, 0.15, 0.9)["passed"]
    (True, False)
    """
    gain_ok, auc_ok = gain >= min_gain - _EPS, auc is not None and auc >= min_auc - _EPS
    auc_text = "unknown (no prompt had both a right and a wrong sample)" if auc is None else f"{auc:.3f}"
    facts = (
        f"the reward model's best of {k} is {gain * 100:+.1f} points over greedy decoding "
        f"({'>=' if gain_ok else 'needs >='} {min_gain * 100:g}) and ranks a right sample above a wrong one of the "
        f"same prompt with AUC {auc_text} ({'>=' if auc_ok else 'needs >='} {min_auc:g})"
    )
    reason = (
        facts + ": PPO has a gain the reward model can see"
        if gain_ok and auc_ok
        else facts + ": PPO against this reward model is unlikely to beat the controls"
    )
    return {"best_of_k_gain": gain, "right_wrong_auc": auc, "min_gain": min_gain, "min_auc": min_auc, "k": k,
            "passed": gain_ok and auc_ok, "reason": reason}  # fmt: skip


def reward_gate(best_of_k: dict[str, Any] | None, min_gain: float, min_auc: float) -> dict[str, Any] | None:
    """:func:`judge_gate` of the ``all`` row of a best-of-k check (``{"k", "tasks"}``); None without the check."""
    if (found := _all_row(best_of_k)) is None:
        return None
    k, row = found
    return judge_gate(row["rm_best_of_k"] - row["greedy"], row["rm_auc"], min_gain, min_auc, k)


def reward_check(
    best_of_k: dict[str, Any] | None, min_gain: float, min_auc: float
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What the reward stage records of its best-of-k check: ``(metrics, gate)`` from :func:`best_of_k_metrics`
    and :func:`reward_gate`; the gate is logged (a warning when it fails)."""
    gate = reward_gate(best_of_k, min_gain, min_auc)
    if gate is not None:
        log.log(logging.INFO if gate["passed"] else logging.WARNING, "reward: gate before PPO %s: %s",
                "passed" if gate["passed"] else "FAILED", gate["reason"])  # fmt: skip
    return best_of_k_metrics(best_of_k), gate


def gate_warning(gate: dict[str, Any]) -> str:
    """The PPO stage's warning for a failed :func:`reward_gate`: the numbers, the thresholds and what follows."""
    auc = "unknown" if gate["right_wrong_auc"] is None else f"{gate['right_wrong_auc']:.3f}"
    return (
        f"the reward stage's gate before PPO failed: best-of-{gate['k']} gain {gate['best_of_k_gain']:+.3f} "
        f"(needs >= {gate['min_gain']:g}, report.gate_min_best_of_k_gain), right-vs-wrong AUC {auc} "
        f"(needs >= {gate['min_auc']:g}, report.gate_min_right_wrong_auc): {gate['reason']}. PPO runs anyway."
    )


def _controls(ppo: dict[str, Any], reward: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    if ppo.get("sft_checker_accuracy") is not None:
        found.append({"name": SFT, "accuracy": ppo["sft_checker_accuracy"],
                      "ci95": ppo.get("sft_checker_accuracy_ci95"), "note": "PPO's held-out prompts"})  # fmt: skip
    ks = sorted((int(m.group(1)) for key in reward if (m := _BEST_OF.match(key)) and reward[key] is not None),
                key=lambda k: (k != 8, k))  # fmt: skip
    if ks:
        key = best_of_k_key(ks[0])
        found.append({"name": f"reward model's best of {ks[0]}", "accuracy": reward[key],
                      "ci95": reward.get(f"{key}_ci95"), "note": "the reward data's held-out prompts"})  # fmt: skip
    if ppo.get("dpo_policy_checker_accuracy") is not None:
        found.append({"name": DPO, "accuracy": ppo["dpo_policy_checker_accuracy"],
                      "ci95": ppo.get("dpo_policy_checker_accuracy_ci95"),
                      "note": "PPO's held-out prompts"})  # fmt: skip
    return found


def _position(ppo_ci: list[float], ctl_ci: list[float]) -> str:
    """Where PPO's interval lies against a control's: above, below, or overlaps."""
    if ppo_ci[0] > ctl_ci[1]:
        return "above"
    return "below" if ppo_ci[1] < ctl_ci[0] else "overlaps"


def controls_verdict(ppo_metrics: dict[str, Any], reward_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare PPO's held-out checker accuracy with each control available (module docstring).

    An accuracy without a recorded ``_ci95`` (a manifest from before intervals) counts as the point interval.

    Args:
        ppo_metrics: the PPO manifest's ``metrics``.
        reward_metrics: the reward manifest's ``metrics`` (None: no reward manifest, e.g. a reward model from the
            Hub).

    Returns:
        ``{"ppo": {"accuracy", "ci95"}, "controls": [{"name", "accuracy", "ci95", "note", "ppo_is"}],
        "strongest", "outcome", "winner", "text"}``: ``ppo_is`` is PPO's interval against the control's (``above``,
        ``below``, ``overlaps``); ``outcome`` is ``control_wins`` (some control's interval lies above PPO's: a
        cheaper path wins; ``winner`` the strongest such control), ``ppo_wins`` (PPO's lies above every control's),
        ``not_distinguishable``, ``no_controls`` or ``no_ppo``.
    """
    acc = ppo_metrics.get("checker_accuracy")
    ppo_ci = ppo_metrics.get("checker_accuracy_ci95") or ([acc, acc] if acc is not None else None)
    controls = _controls(ppo_metrics, reward_metrics or {})
    for c in controls:
        c["ci95"] = c["ci95"] or [c["accuracy"], c["accuracy"]]
        c["ppo_is"] = _position(ppo_ci, c["ci95"]) if ppo_ci else None
    strongest = max(controls, key=lambda c: c["accuracy"]) if controls else None
    out = {"ppo": {"accuracy": acc, "ci95": ppo_ci}, "controls": controls,
           "strongest": strongest["name"] if strongest else None, "winner": None}  # fmt: skip
    if acc is None or strongest is None:
        out["outcome"] = "no_ppo" if acc is None else "no_controls"
        out["text"] = "No PPO checker accuracy to compare." if acc is None else "No control to compare PPO with."
        return out
    ppo_txt = f"PPO's {percent(acc)} {_ci(ppo_ci)}"
    beaten = [c for c in controls if c["ppo_is"] == "below"]
    if beaten:
        win = max(beaten, key=lambda c: c["accuracy"])
        out.update(outcome="control_wins", winner=win["name"])
        text = (f"A cheaper path wins: the {win['name']}, {percent(win['accuracy'])} {_ci(win['ci95'])}, is above "
                f"{ppo_txt} with non-overlapping 95% intervals.")  # fmt: skip
    elif all(c["ppo_is"] == "above" for c in controls):
        out.update(outcome="ppo_wins", winner="PPO")
        best = f"the {strongest['name']}, {percent(strongest['accuracy'])} {_ci(strongest['ci95'])}"
        text = (f"PPO wins: {ppo_txt} is above every control with non-overlapping 95% intervals; the strongest "
                f"control is {best}.")  # fmt: skip
    else:
        close = [c for c in controls if c["ppo_is"] == "overlaps"]
        names = ", ".join(f"the {c['name']} ({percent(c['accuracy'])} {_ci(c['ci95'])})" for c in close)
        out["outcome"] = "not_distinguishable"
        text = (f"PPO and the controls are not distinguishable: {ppo_txt} overlaps the 95% interval of {names}; "
                f"the strongest control is the {strongest['name']}.")  # fmt: skip
    if any(c["name"].startswith("reward model's best of") for c in controls):
        text += (" The reward model's best of k is measured on the reward data's held-out prompts, which may differ "
                 "from PPO's held-out prompts.")  # fmt: skip
    out["text"] = text
    return out


def format_controls(verdict: dict[str, Any]) -> list[str]:
    """:func:`controls_verdict` as a markdown table (PPO, then each control) and its verdict."""
    lines = ["| model | checker accuracy | 95% interval | prompts | PPO is |", "|---|---|---|---|---|"]
    p = verdict["ppo"]
    lines.append(f"| PPO | {percent(p['accuracy'])} | {_ci(p['ci95'])} | PPO's held-out prompts | |")
    for c in verdict["controls"]:
        mark = f"**{c['ppo_is']}**" if c["ppo_is"] == "below" else (c["ppo_is"] or "-")
        lines.append(f"| {c['name']} | {percent(c['accuracy'])} | {_ci(c['ci95'])} | {c['note']} | {mark} |")
    return [*lines, "", verdict["text"]]
