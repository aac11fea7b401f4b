"""Reward model vs checker on held-out answers (pipeline.analysis.agreement): per-task table, transitions, verdict;
best-of-k (pipeline.analysis.best_of_k)."""

from __future__ import annotations

from pipeline.analysis.agreement import format_markdown, rm_vs_checker


def _a(task, answer, sft, sft_score, policy, policy_score, prompt="q"):
    return {"prompt": prompt, "task": task, "answer": answer, "sft": sft, "sft_score": sft_score,
            "policy": policy, "policy_score": policy_score}  # fmt: skip


def test_exploitation_is_detected_and_counted():
    answers = [
        _a("add", "103", "103", 3.0, "95", 4.0, "Add 55 and 48."),  # right -> wrong, reward up: exploited
        _a("add", "80", "86", 2.0, "80", 2.5),  # wrong -> right, reward up
        _a("count", "5", "5", 6.0, "5", 6.1),  # unchanged right
        _a("count", "4", "3", 1.0, "2", 1.5),  # wrong -> wrong, reward up
        _a("spell", "k i n g", "k i n g", 5.0, "k i n g.", 5.2),  # both right, written differently
    ]
    s = rm_vs_checker(answers, kl=0.2, kl_target=6.0)
    assert s["n"] == 5
    assert s["tasks"]["add"] == {
        "n": 2, "sft_accuracy": 0.5, "ppo_accuracy": 0.5, "sft_reward": 2.5, "ppo_reward": 3.25,
        "rm_agrees": 1, "one_right": 2,
    }  # fmt: skip
    assert s["tasks"]["all"]["sft_accuracy"] == 3 / 5 and s["tasks"]["all"]["ppo_accuracy"] == 3 / 5
    assert s["transitions"] == {
        "wrong_to_right": {"n": 1, "reward_up": 1},
        "right_to_wrong": {"n": 1, "reward_up": 1},
        "wrong_to_wrong": {"n": 1, "reward_up": 1},
    }
    assert (
        s["exploited"] is True and "exploited" in s["verdict"] and "1 answer went from right to wrong" in s["verdict"]
    )
    assert abs(s["reward_gain"] - (sum([4.0, 2.5, 6.1, 1.5, 5.2]) - sum([3.0, 2.0, 6.0, 1.0, 5.0])) / 5) < 1e-9
    (ex,) = s["examples"]
    assert (ex["prompt"], ex["preferred"], ex["preferred_by"], ex["right"]) == ("Add 55 and 48.", "95", "ppo", "103")
    text = "\n".join(format_markdown(s))
    assert "| add | 2 | 50.0% | 50.0% | 2.500 | 3.250 | 1/2 |" in text
    assert "| Add 55 and 48. | 103 | 95 (ppo) | 4.000 | 103 | 3.000 |" in text
    assert "within the target 6" in text and "**Verdict.** PPO exploited" in text


def test_real_gain_and_no_gain_verdicts():
    gain = [_a("add", str(i), "0", 1.0, str(i), 2.0) for i in range(1, 5)] + [_a("add", "9", "9", 1.0, "9", 1.0)]
    s = rm_vs_checker(gain, kl=7.0, kl_target=6.0)
    assert s["exploited"] is False and s["accuracy_gain"] == 4 / 5 and "+80.0 points" in s["verdict"]
    assert s["tasks"]["add"]["rm_agrees"] == 4 == s["tasks"]["add"]["one_right"] and s["examples"] == []
    assert "ABOVE the target 6" in "\n".join(format_markdown(s))
    flat = [_a("add", "1", "0", 2.0, "0", 1.0)]
    s = rm_vs_checker(flat)
    assert s["exploited"] is False and "did not rise" in s["verdict"]


def test_prompts_without_checker_are_skipped():
    assert rm_vs_checker([{"prompt": "hi", "task": None, "answer": None, "sft": "a", "sft_score": 1.0,
                           "policy": "b", "policy_score": 2.0}]) is None  # fmt: skip
    assert rm_vs_checker([]) is None


def test_report_quality_bar_marks_each_check():
    from pipeline.report import quality_lines
    from pipeline.runs import STAGES

    summary = rm_vs_checker([_a("add", "103", "103", 3.0, "95", 4.0)], kl=0.3, kl_target=6.0)
    manifests = {s: {"metrics": {}} for s in STAGES}
    manifests["sft"]["metrics"] = {"checker_accuracy": 0.45, "pretrain_checker_accuracy": 0.0}
    manifests["reward"]["metrics"] = {"pair_accuracy": 0.84}
    manifests["ppo"] = {
        "metrics": {"checker_accuracy": 0.51, "sft_checker_accuracy": 0.45, "reward_mean": 4.9,
                    "sft_reward_mean": 4.7, "kl": 0.3},
        "config": {"ppo": {"kl_target": 6.0}},
        "rm_vs_checker": summary,
    }  # fmt: skip
    text = "\n".join(quality_lines(manifests, total_wall_s=901.0))
    assert "| whole run <= 15 min | 901 s | **not met** |" in text
    assert "| SFT: checker accuracy above the pretrained model's | 0.000 -> 0.450 | met |" in text
    assert "| reward: held-out pair accuracy >= 0.85 | 0.840 | **not met** |" in text
    assert "| PPO: checker accuracy >= SFT's + 5 points | 0.450 -> 0.510 (+6.0) | met |" in text
    assert "| PPO: mean held-out reward up | 4.700 -> 4.900 | met |" in text
    assert "| PPO: KL to the reference within ppo.kl_target | 0.300 (target 6) | met |" in text
    assert "## Reward model vs checker" in text and "**Verdict.**" in text
    assert quality_lines({"sft": {"metrics": {"checker_accuracy": None}}}, 1.0) == []  # no checker: no section


def test_reward_pair_accuracy_by_task_and_kind_of_pair():
    from pipeline.analysis.agreement import format_pairs, pair_accuracy_by_kind
    from pipeline.data.preferences import PreferenceGroup
    from pipeline.data.tasks import response_class

    meta = {"task": "add", "answer": "103"}
    assert [response_class(meta, r) for r in ("103", "101", "The answer is 103.")] == [
        "right",
        "near miss",
        "malformed",
    ]
    # ranking: "103" > "101" > "" ; the reward model puts the near miss first
    add = PreferenceGroup("Add 55 and 48.", ["", "101", "103"], [2, 1, 0], meta=meta)
    count = PreferenceGroup("Count k i n g.", ["4", "5"], [0, 1], meta={"task": "count", "answer": "4"})
    hub = PreferenceGroup("hi", ["a", "b"], [0, 1])  # no checker: skipped
    got = pair_accuracy_by_kind([add, count, hub], [[0.0, 2.0, 1.0], [3.0, 1.0], [0.0, 1.0]])
    assert got == {
        "add": {"right > near miss": [0, 1], "right > malformed": [1, 1], "near miss > malformed": [1, 1]},
        "count": {"right > near miss": [1, 1]},
        "all": {"right > near miss": [1, 2], "right > malformed": [1, 1], "near miss > malformed": [1, 1]},
    }
    lines = format_pairs(got)
    assert lines[0] == "| task | right > near miss | right > malformed | near miss > malformed |"
    assert lines[2] == "| add | 0.00 (1) | 1.00 (1) | 1.00 (1) |" and lines[3] == "| count | 1.00 (1) | - | - |"
    assert pair_accuracy_by_kind([hub], [[0.0, 1.0]]) is None


def test_best_of_k_counts_what_the_reward_model_picks():
    import pytest

    from pipeline.analysis.best_of_k import best_of_k, format_best_of_k

    records = [
        {"prompt": "What is 2 + 2?", "task": "add", "answer": "4"},
        {"prompt": "Reverse a b.", "task": "reverse", "answer": "b a"},
        {"prompt": "hub", "answer": "x"},  # no task: no checker, skipped
    ]
    greedy = ["4", "a b", "x"]
    samples = ["4", "5", "5", "b a", "a b", "b a", "x", "x", "x"]  # k = 3
    scores = [1.0, 2.0, 1.0, 0.5, 0.5, 0.1, 0, 0, 0]  # add: the RM prefers "5"; reverse: a tie between right and wrong
    got = best_of_k(records, greedy, samples, scores, 3)
    assert list(got) == ["add", "reverse", "all"]
    assert got["add"] == {
        "n": 1, "greedy": 1.0, "sampled": 1 / 3, "pass_at_k": 1.0, "rm_best_of_k": 0.0, "rm_auc": 0.25,
        "auc_prompts": 1,
    }  # fmt: skip
    # add: the right 1.0 against the wrong 2.0 (a loss) and 1.0 (a tie, half a win): 0.25.
    # reverse: right samples 0.5 and 0.1 against a wrong 0.5: a tie (0.5) and a loss (0); best of k: the first
    # of the tied maxima, "b a", right
    assert got["reverse"]["rm_auc"] == 0.25 and got["reverse"]["rm_best_of_k"] == 1.0
    assert got["all"]["n"] == 2 and got["all"]["greedy"] == 0.5 and got["all"]["rm_best_of_k"] == 0.5
    assert got["all"]["rm_auc"] == (0.5 + 0.5) / (2 + 2) and got["all"]["auc_prompts"] == 2
    lines = format_best_of_k(got, 3)
    assert lines[2].startswith("| add | 1 | 1.000 | 0.333 | 1.000 | 0.000 | 0.250 (1) |")
    assert "50.0% of the time against 50.0%" in lines[-1] and "not clearly above" in lines[-1]
    better = best_of_k(records[:1], ["5"], ["4", "5", "6"], [3.0, 1.0, 0.0], 3)
    assert better["all"]["rm_best_of_k"] == 1.0 and better["all"]["greedy"] == 0.0
    assert "a gain the reward model can see" in format_best_of_k(better, 3)[-1]
    worse = best_of_k(records[:1], ["4"], ["4", "5", "6"], [0.0, 1.0, 0.0], 3)
    assert "expected to lower checker accuracy" in format_best_of_k(worse, 3)[-1]
    assert best_of_k(records[2:], ["x"], ["x"] * 3, [0.0] * 3, 3) is None
    with pytest.raises(ValueError, match="3 records need 3 greedy answers and 9 samples"):
        best_of_k(records, greedy, samples[:-1], scores, 3)


def test_ppo_warns_when_the_reward_stages_gate_fails(tmp_path, caplog):
    import json
    import logging

    from pipeline.config import ReportConfig
    from stages.ppo import _reward_manifest, _warn_if_gate_failed

    row = {"n": 200, "greedy": 0.45, "sampled": 0.37, "pass_at_k": 0.53, "rm_best_of_k": 0.375, "rm_auc": 0.68,
           "auc_prompts": 50}  # fmt: skip
    (tmp_path / "artifact").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"best_of_k": {"k": 8, "tasks": {"all": row}}}))
    with caplog.at_level(logging.WARNING, logger="stages.ppo"):
        _warn_if_gate_failed(_reward_manifest(tmp_path / "artifact"), ReportConfig())
    assert "gate before PPO failed: best-of-8 gain -0.075 (needs >= 0.15" in caplog.text
    assert "right-vs-wrong AUC 0.680 (needs >= 0.9" in caplog.text and "PPO runs anyway" in caplog.text
    assert "37.5% of the time against 45.0%" in caplog.text and "expected to lower checker accuracy" in caplog.text
    caplog.clear()
    row.update(rm_best_of_k=0.6, rm_auc=0.93)  # 15 points over greedy, AUC above 0.9: the gate passes
    (tmp_path / "manifest.json").write_text(json.dumps({"best_of_k": {"k": 8, "tasks": {"all": row}}}))
    with caplog.at_level(logging.WARNING, logger="stages.ppo"):
        _warn_if_gate_failed(_reward_manifest(tmp_path / "artifact"), ReportConfig())
        _warn_if_gate_failed(_reward_manifest(tmp_path / "elsewhere" / "artifact"), ReportConfig())  # from the Hub
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="stages.ppo"):  # this run's thresholds judge the recorded numbers
        _warn_if_gate_failed(_reward_manifest(tmp_path / "artifact"), ReportConfig(gate_min_right_wrong_auc=0.95))
    assert "right-vs-wrong AUC 0.930 (needs >= 0.95" in caplog.text
