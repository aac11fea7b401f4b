"""The run report's quality bar reads its thresholds from the ``report:`` config section."""

from pipeline.config import ReportConfig, load_config
from pipeline.report import quality_lines
from pipeline.runs import STAGES


def _manifests() -> dict:
    manifests = {s: {"metrics": {}} for s in STAGES}
    manifests["sft"]["metrics"] = {"checker_accuracy": 0.45, "pretrain_checker_accuracy": 0.0}
    manifests["reward"]["metrics"] = {"pair_accuracy": 0.84}
    manifests["ppo"] = {"metrics": {"checker_accuracy": 0.51, "sft_checker_accuracy": 0.45}}
    return manifests


def test_defaults_are_the_documented_bar():
    assert load_config(None).report == ReportConfig()
    text = "\n".join(quality_lines(_manifests(), 901.0, ReportConfig()))
    assert "| whole run <= 15 min | 901 s | **not met** |" in text
    assert "| reward: held-out pair accuracy >= 0.85 | 0.840 | **not met** |" in text
    assert "| PPO: checker accuracy >= SFT's + 5 points | 0.450 -> 0.510 (+6.0) | met |" in text


def test_thresholds_come_from_the_config():
    cfg = load_config(
        None, ["report.max_wall_time_s=1200", "report.min_reward_pair_accuracy=0.8", "report.min_ppo_accuracy_gain=0.1"]
    )
    text = "\n".join(quality_lines(_manifests(), 901.0, cfg.report))
    assert "| whole run <= 20 min | 901 s | met |" in text
    assert "| reward: held-out pair accuracy >= 0.8 | 0.840 | met |" in text
    assert "| PPO: checker accuracy >= SFT's + 10 points | 0.450 -> 0.510 (+6.0) | **not met** |" in text
