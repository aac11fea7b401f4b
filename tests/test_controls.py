"""Accuracy intervals, the gate before PPO and PPO against the strongest control (pipeline.analysis.checker and
pipeline.analysis.controls), on literal numbers and fake manifests."""

from __future__ import annotations

import doctest

import pytest

from pipeline.analysis import checker, controls
from pipeline.analysis.checker import checker_accuracy, checker_accuracy_ci, wilson_ci95, wilson_interval
from pipeline.analysis.controls import (
    best_of_k_metrics,
    controls_verdict,
    format_controls,
    reward_check,
    reward_gate,
)
from pipeline.config import ConfigError, ReportConfig, load_config
from pipeline.report import quality_lines
from pipeline.runs import STAGES


@pytest.mark.parametrize("module", [checker, controls])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- Wilson interval


# Wilson (1927): center = (p + z^2/2n) / (1 + z^2/n), half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2), z = 1.959964
# (z^2 = 3.841459).
# 0/10:   z^2/n = 0.384146, denominator 1.384146; center = 0.192073 / 1.384146 = 0.138767;
#         half = 1.416010 * sqrt(0 + 3.841459/400) = 1.416010 * 0.097998 = 0.138767  -> [0, 0.2775]
# 10/10:  the mirror image of 0/10                                                   -> [0.7225, 1]
# 45/100: z^2/n = 0.038415, denominator 1.038415; center = (0.45 + 0.019207) / 1.038415 = 0.451845;
#         half = 1.887452 * sqrt(0.002475 + 0.000096) = 1.887452 * 0.050705 = 0.095704 -> [0.3561, 0.5476]
# 5/10:   center 0.5 (symmetric); half = 1.416010 * sqrt(0.025 + 0.009604) = 0.263407  -> [0.2366, 0.7634]
@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (45, 100, 0.3561, 0.5476), (5, 10, 0.2366, 0.7634)],
)
def test_wilson_interval_hand_computed(successes, n, low, high):
    lo, hi = wilson_interval(successes, n)
    assert (round(lo, 4), round(hi, 4)) == (low, high)
    assert 0.0 <= lo <= successes / n <= hi <= 1.0
    assert wilson_ci95(successes, n) == [low, high]


def test_wilson_interval_narrows_with_n_and_refuses_bad_counts():
    wide, narrow = wilson_interval(5, 10), wilson_interval(500, 1000)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert wilson_ci95(0, 0) is None
    for bad in ((1, 0), (-1, 10), (11, 10)):
        with pytest.raises(ValueError, match="wilson_interval"):
            wilson_interval(*bad)


def test_checker_accuracy_ci_counts_only_checkable_records():
    records = [{"task": "add", "answer": "5"}, {"task": "add", "answer": "7"}, {"prompt": "no checker"}]
    acc, ci, n = checker_accuracy_ci(records, ["5", "8", "anything"])
    assert (acc, n) == (0.5, 2) and acc == checker_accuracy(records, ["5", "8", "anything"])
    assert ci == wilson_ci95(1, 2) and ci[0] <= acc <= ci[1]
    assert checker_accuracy_ci(records[2:], ["x"]) == (None, None, 0)
    with pytest.raises(ValueError, match="2 records but 1 responses"):
        checker_accuracy_ci(records[:2], ["5"])


# ----------------------------------------------------------------------------- the reward stage's check and gate


def _bok(greedy: float, best: float, auc: float | None, k: int = 8, n: int = 200) -> dict:
    row = {"n": n, "greedy": greedy, "sampled": 0.3, "pass_at_k": 0.9, "rm_best_of_k": best, "rm_auc": auc,
           "auc_prompts": 150}  # fmt: skip
    return {"k": k, "tasks": {"add": dict(row), "all": row}}


def test_best_of_k_metrics_come_from_the_all_row_and_name_k():
    m = best_of_k_metrics(_bok(0.415, 0.73, 0.929))
    assert m["greedy_accuracy"] == 0.415 and m["best_of_8_accuracy"] == 0.73 and m["right_wrong_auc"] == 0.929
    assert m["greedy_accuracy_ci95"] == wilson_ci95(83, 200) and m["best_of_8_accuracy_ci95"] == wilson_ci95(146, 200)
    assert m["best_of_k_n"] == 200
    four = best_of_k_metrics(_bok(0.4, 0.6, 0.9, k=4))
    assert "best_of_4_accuracy" in four and "best_of_8_accuracy" not in four
    assert best_of_k_metrics(None) == {} and best_of_k_metrics({"k": 8, "tasks": None}) == {}


def test_gate_passes_and_fails_on_each_threshold():
    ok = reward_gate(_bok(0.415, 0.73, 0.929), 0.15, 0.90)
    assert ok["passed"] and ok["best_of_k_gain"] == pytest.approx(0.315) and ok["right_wrong_auc"] == 0.929
    assert (ok["min_gain"], ok["min_auc"]) == (0.15, 0.90) and "+31.5 points" in ok["reason"]
    small_gain = reward_gate(_bok(0.45, 0.55, 0.95), 0.15, 0.90)
    assert not small_gain["passed"] and "(needs >= 15)" in small_gain["reason"]
    low_auc = reward_gate(_bok(0.40, 0.70, 0.85), 0.15, 0.90)
    assert not low_auc["passed"] and "AUC 0.850 (needs >= 0.9)" in low_auc["reason"]
    assert not reward_gate(_bok(0.40, 0.70, None), 0.15, 0.90)["passed"]  # no AUC: no evidence
    assert reward_gate(_bok(0.45, 0.60, 0.90), 0.15, 0.90)["passed"]  # exactly on both thresholds
    assert reward_gate(None, 0.15, 0.90) is None


def test_reward_check_returns_metrics_and_gate_and_logs_a_failed_gate(caplog):
    with caplog.at_level("WARNING", logger="pipeline.analysis.controls"):
        metrics, gate = reward_check(_bok(0.45, 0.375, 0.68), 0.15, 0.90)
    assert metrics["best_of_8_accuracy"] == 0.375 and gate is not None and not gate["passed"]
    assert "gate before PPO FAILED" in caplog.text
    assert reward_check(None, 0.15, 0.90) == ({}, None)


def test_gate_thresholds_are_report_config_fields_range_checked():
    assert (ReportConfig().gate_min_best_of_k_gain, ReportConfig().gate_min_right_wrong_auc) == (0.15, 0.90)
    cfg = load_config(None, ["report.gate_min_best_of_k_gain=0.1", "report.gate_min_right_wrong_auc=0.8"])
    assert (cfg.report.gate_min_best_of_k_gain, cfg.report.gate_min_right_wrong_auc) == (0.1, 0.8)
    with pytest.raises(ConfigError, match=r"gate_min_best_of_k_gain.*gate_min_right_wrong_auc"):
        ReportConfig(gate_min_best_of_k_gain=1.5, gate_min_right_wrong_auc=-0.1)


# ----------------------------------------------------------------------------- PPO against the strongest control


def _ppo(acc: float, sft: float, dpo: float | None = None, n: int = 500) -> dict:
    m = {"checker_accuracy": acc, "checker_accuracy_ci95": wilson_ci95(round(acc * n), n), "n_eval": n,
         "sft_checker_accuracy": sft, "sft_checker_accuracy_ci95": wilson_ci95(round(sft * n), n)}  # fmt: skip
    if dpo is not None:
        m.update(dpo_policy_checker_accuracy=dpo, dpo_policy_checker_accuracy_ci95=wilson_ci95(round(dpo * n), n))
    return m


def _reward(best: float, n: int = 200) -> dict:
    return {
        "pair_accuracy": 0.95,
        "best_of_8_accuracy": best,
        "best_of_8_accuracy_ci95": wilson_ci95(round(best * n), n),
    }


def test_a_stronger_dpo_policy_wins():
    # on 500 prompts PPO 0.50 [0.456, 0.544], SFT 0.40 [0.358, 0.444], the DPO policy 0.62 [0.577, 0.661]; on 200 the
    # best of 8 0.55 [0.481, 0.617]: PPO is above SFT, overlaps the best of 8 and is below the DPO policy
    v = controls_verdict(_ppo(0.50, 0.40, dpo=0.62), _reward(0.55))
    assert v["outcome"] == "control_wins" and v["winner"] == "DPO policy" and v["strongest"] == "DPO policy"
    assert v["text"].startswith("A cheaper path wins: the DPO policy, 62.0%")
    assert "reward data's held-out prompts, which may differ from PPO's" in v["text"]
    assert {c["name"]: c["ppo_is"] for c in v["controls"]} == {
        "SFT model (greedy)": "above", "reward model's best of 8": "overlaps", "DPO policy": "below"}  # fmt: skip
    table = "\n".join(format_controls(v))
    assert "| DPO policy | 62.0% | [57.7, 66.1] | PPO's held-out prompts | **below** |" in table


def test_ppo_above_every_control_wins():
    # PPO 0.70 [0.658, 0.739]; SFT 0.44, best of 8 0.55 [0.481, 0.617], DPO 0.60 [0.556, 0.642]: all below PPO
    v = controls_verdict(_ppo(0.70, 0.44, dpo=0.60), _reward(0.55))
    assert v["outcome"] == "ppo_wins" and v["winner"] == "PPO" and v["strongest"] == "DPO policy"
    assert v["text"].startswith("PPO wins: PPO's 70.0% [65.8, 73.9] is above every control")
    assert all(c["ppo_is"] == "above" for c in v["controls"])


def test_overlapping_intervals_are_not_distinguishable():
    # PPO 0.60 [0.556, 0.642] and the reward model's best of 8 on 200 prompts, 0.62 [0.551, 0.684]: they overlap
    v = controls_verdict(_ppo(0.60, 0.44), _reward(0.62))
    assert v["outcome"] == "not_distinguishable" and v["winner"] is None
    assert v["strongest"] == "reward model's best of 8" and "not distinguishable" in v["text"]
    assert "the reward model's best of 8 (62.0% [55.1, 68.4])" in v["text"]


def test_verdict_without_ppo_or_controls_and_with_another_k():
    assert controls_verdict({}, _reward(0.6))["outcome"] == "no_ppo"
    assert controls_verdict({"checker_accuracy": 0.5}, None)["outcome"] == "no_controls"
    v = controls_verdict(_ppo(0.7, 0.4), {"best_of_4_accuracy": 0.5, "best_of_4_accuracy_ci95": [0.45, 0.55]})
    assert [c["name"] for c in v["controls"]] == ["SFT model (greedy)", "reward model's best of 4"]


def test_report_has_the_gate_row_and_the_controls_table():
    manifests = {s: {"metrics": {}} for s in STAGES}
    manifests["sft"]["metrics"] = {"checker_accuracy": 0.44, "pretrain_checker_accuracy": 0.0}
    manifests["reward"] = {"metrics": _reward(0.55), "best_of_k": _bok(0.45, 0.55, 0.80)}
    manifests["ppo"] = {"metrics": _ppo(0.50, 0.44, dpo=0.62)}
    text = "\n".join(quality_lines(manifests, 600.0, ReportConfig()))
    assert ("| reward: gate before PPO: best of 8 >= greedy + 15 points and right-vs-wrong AUC >= 0.9 | "
            "+10.0 points, AUC 0.800 | **not met** |") in text  # fmt: skip
    assert "| PPO: above the strongest control (DPO policy), non-overlapping 95% intervals | control wins |" in text
    assert "## PPO against the controls" in text and "A cheaper path wins: the DPO policy" in text
    lenient = "\n".join(quality_lines(manifests, 600.0, ReportConfig(gate_min_best_of_k_gain=0.1,
                                                                     gate_min_right_wrong_auc=0.8)))  # fmt: skip
    assert "+10.0 points, AUC 0.800 | met |" in lenient
