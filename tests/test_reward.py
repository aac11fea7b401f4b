"""Reward model: loss, collator, scoring, metrics, and the stage (train, resume, skip, artifact)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_artifacts import make_fake_upstream, make_tiny_lm, make_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.config import load_config
from pipeline.data.preferences import PreferenceGroup
from pipeline.reward import format_for_reward
from pipeline.reward.data import GroupedPreferenceCollator, encode_groups, grouped_rows, pairwise_rows
from pipeline.reward.evaluation import ranking_metrics, reward_stats
from pipeline.reward.losses import grouped_bradley_terry_loss
from pipeline.reward.scalar import ScalarReward, load_reward_model
from pipeline.runs import StageDir
from pipeline.training import MetricsCallback, StopSignal
from tests.helpers_launch import accelerate_launch, child_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- unit: loss and collator


def test_grouped_loss_hand_computed():
    # one prompt, K=3, ranking [0, 2, 1]: comparisons (0>2), (0>1), (2>1), each weight 1/C(3,2) = 1/3
    r = torch.tensor([2.0, 0.0, 1.0])
    w, lo, wt = torch.tensor([0, 0, 2]), torch.tensor([2, 1, 1]), torch.full((3,), 1 / 3)
    # -(1/3) * (log s(2-1) + log s(2-0) + log s(1-0)) = (0.313262 + 0.126928 + 0.313262) / 3 = 0.251151
    assert grouped_bradley_terry_loss(r, w, lo, wt).item() == pytest.approx(0.251151, abs=1e-6)
    # margin m=1 on every comparison: diffs become 0, 1, 0 -> (0.693147 + 0.313262 + 0.693147) / 3 = 0.566519
    m = torch.ones(3)
    assert grouped_bradley_terry_loss(r, w, lo, wt, m).item() == pytest.approx(0.566519, abs=1e-6)


def test_grouped_loss_with_one_pair_per_prompt_is_trl_bradley_terry():
    chosen, rejected = torch.randn(5), torch.randn(5)
    rewards = torch.cat([chosen, rejected])
    trl_loss = -F.logsigmoid(chosen - rejected).mean()  # RewardTrainer.compute_loss
    ours = grouped_bradley_terry_loss(rewards, torch.arange(5), torch.arange(5, 10), torch.full((5,), 1 / 5))
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)


def test_collator_flattens_groups_and_weights_each_prompt_once():
    rows = [
        {"input_ids": [[1, 2, 3], [4]], "winners": [1], "losers": [0], "weights": [1.0], "margins": [0.5]},
        {"input_ids": [[5], [6, 7], [8], [9]], "winners": [3, 3, 3, 0, 0, 1], "losers": [0, 1, 2, 1, 2, 2],
         "weights": [1 / 6] * 6, "margins": [0.0] * 6},
    ]  # fmt: skip
    b = GroupedPreferenceCollator(pad_token_id=0)(rows)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 0, 0], [6, 7, 0], [8, 0, 0], [9, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]]
    assert b["winners"].tolist() == [1, 5, 5, 5, 2, 2, 3]  # second group offset by 2 sequences
    assert b["losers"].tolist() == [0, 2, 3, 4, 3, 4, 4]
    # each prompt's comparisons sum to 1 / (prompts in batch): the K=2 prompt weighs as much as the K=4 one
    assert b["weights"][:1].sum().item() == pytest.approx(0.5)
    assert b["weights"][1:].sum().item() == pytest.approx(0.5)
    assert b["margins"].tolist() == [0.5] + [0.0] * 6


# ----------------------------------------------------------------------------- unit: metrics


def test_ranking_metrics():
    g3 = PreferenceGroup("q", ["a", "b", "c"], [2, 0, 1])  # true order c > a > b
    perfect = ranking_metrics([g3], [torch.tensor([1.0, 0.0, 2.0])])
    assert (perfect.pair_accuracy, perfect.rank_correlation, perfect.kendall_tau) == (1.0, 1.0, 1.0)
    reverse = ranking_metrics([g3], [torch.tensor([1.0, 2.0, 0.0])])
    assert (reverse.pair_accuracy, reverse.rank_correlation, reverse.kendall_tau) == (0.0, -1.0, -1.0)
    assert reverse.chosen == [0.0] and reverse.rejected == [2.0]  # rewards of the true best / worst
    # a tie counts as wrong for accuracy and as neither for Kendall; K=2 groups have no rank correlation
    pair = PreferenceGroup("q", ["x", "y"], [0, 1])
    tie = ranking_metrics([pair], [torch.tensor([1.0, 1.0])])
    assert tie.pair_accuracy == 0.0 and tie.rank_correlation is None
    assert tie.val_loss == pytest.approx(math.log(2))


def test_reward_stats():
    assert reward_stats(torch.tensor([1.0, 3.0])) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert reward_stats(torch.tensor([5.0]))["std"] == 1.0  # a safe divisor


# ----------------------------------------------------------------------------- model and scoring


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer([_TEXT] * 20)


_TEXT = "yes no yes no Answer question"


def test_format_for_reward_uses_the_chat_template(tok):
    assert format_for_reward(tok, "2+2?", "4") == "<|user|>2+2?<|end|><|assistant|>4<|end|>"
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert format_for_reward(tok, conv, "a") == "<|system|>s<|end|><|user|>u<|end|><|assistant|>a<|end|>"


def test_load_reward_model_keeps_the_backbone_and_scores_independently_of_padding(tmp_path, tok):
    lm = make_tiny_lm(tok)
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    rm, rtok = load_reward_model(str(tmp_path))
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    assert torch.equal(rm.transformer.wte.weight, lm.transformer.wte.weight)
    assert torch.equal(rm.transformer.h[1].mlp.c_fc.weight, lm.transformer.h[1].mlp.c_fc.weight)
    prompts = ["Answer 1", "Answer 22", [{"role": "user", "content": "Answer 3"}]]
    responses = ["yes", "no no no yes yes", "yes no"]
    batched = ScalarReward(rm, rtok).score_texts(prompts, responses, batch_size=3)
    single = ScalarReward(rm, rtok).score_texts(prompts, responses, batch_size=1)
    assert batched.shape == (3,) and torch.allclose(batched, single, atol=1e-5)  # right padding is ignored
    ids = rtok(format_for_reward(rtok, "Answer 1", "yes"), return_tensors="pt").input_ids
    assert batched[0].item() == pytest.approx(rm(ids).logits[0, 0].item(), abs=1e-5)


def test_rows_for_grouped_and_pairwise_training(tok):
    groups = [PreferenceGroup("Answer 1", ["yes", "no", "yes yes"], [2, 0, 1], scores=[0.5, 0.0, 1.0]),
              PreferenceGroup("Answer 2", ["no", "yes " * 80], [1, 0])]  # fmt: skip
    encoded, dropped = encode_groups(tok, groups, max_length=40)
    assert dropped == 1 and len(encoded) == 1  # the group with an over-long response is dropped whole
    assert encoded[0][1][0] == tok(format_for_reward(tok, "Answer 1", "yes"), add_special_tokens=False).input_ids
    (row,) = grouped_rows(encoded, use_margin=True)
    assert (row["winners"], row["losers"]) == ([2, 2, 0], [0, 1, 1])
    assert row["weights"] == pytest.approx([1 / 3] * 3) and row["margins"] == pytest.approx([0.5, 1.0, 0.5])
    pairs = pairwise_rows(encoded, use_margin=False)  # kwise=pairs: 3 independent rows, weight 1 each
    assert len(pairs) == 3 and set(pairs[0]) == {"chosen_ids", "rejected_ids"}
    assert pairs[0]["chosen_ids"] == encoded[0][1][2] and pairs[0]["rejected_ids"] == encoded[0][1][0]


def test_load_reward_model_adds_chat_tokens_to_an_external_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator([_TEXT] * 5, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    ext = PreTrainedTokenizerFast(tokenizer_object=raw)  # no special tokens, no pad, no chat template
    ext.save_pretrained(tmp_path)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(ext), n_layer=1, n_embd=16, n_head=2)).save_pretrained(tmp_path)
    rm, rtok = load_reward_model(str(tmp_path))
    assert len(rtok) > len(ext) and rm.get_input_embeddings().num_embeddings == len(rtok)
    assert rm.config.pad_token_id == rtok.convert_tokens_to_ids("<|pad|>")
    assert format_for_reward(rtok, "q", "a") == "<|user|>q<|end|><|assistant|>a<|end|>"
    assert ScalarReward(rm, rtok).score_texts(["q", "q"], ["a", "yes no"]).shape == (2,)


def test_reward_config_rejects_bad_values_naming_the_keys():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"reward\.batch_size must be >= 1, got 0.*reward\.max_steps must be -1"):
        load_config(None, ["reward.batch_size=0", "reward.max_steps=0"])
    with pytest.raises(ConfigError, match=r"reward\.kwise"):
        load_config(None, ["reward.kwise=shuffled"])


def test_metrics_callback_maps_keys_and_stops_on_nan():
    from types import SimpleNamespace

    from pipeline.runs import StageError
    from stages.reward import METRIC_KEYS

    lines: list[dict] = []
    cb = MetricsCallback(lines.append, METRIC_KEYS, "reward")
    state = SimpleNamespace(global_step=40, is_world_process_zero=True)
    cb.on_log(SimpleNamespace(output_dir="ckpts"), state, None, {"loss": 0.5, "eval_accuracy": 0.9, "epoch": 1.0})
    assert lines == [{"step": 40, "train/loss": 0.5, "rm/accuracy": 0.9}]
    with pytest.raises(StageError, match=r"loss is nan at step 40.*last good checkpoint stays in ckpts"):
        cb.on_log(SimpleNamespace(output_dir="ckpts"), state, None, {"loss": float("nan")})


def test_stop_on_signal_requests_a_save_and_restores_handlers():
    from transformers import TrainerControl

    before = signal.getsignal(signal.SIGTERM)
    stopper = StopSignal()
    with stopper:
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process keeps running
        control = TrainerControl()
        stopper.on_step_end(None, None, control)
    assert stopper.stopped_by == "SIGTERM" and control.should_save and control.should_training_stop
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- the stage


def _kwise(n: int, k: int, seed: int, start: int = 0) -> list[dict]:
    """Synthetic ranked responses: 6 words of yes/no; more "yes" is better (distinct counts, no ties)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        counts = rng.sample(range(7), k)
        responses = []
        for c in counts:
            words = ["yes"] * c + ["no"] * (6 - c)
            rng.shuffle(words)
            responses.append(" ".join(words))
        ranking = sorted(range(k), key=lambda j: -counts[j])
        out.append({"prompt": f"Answer {start + i}", "responses": responses, "ranking": ranking})
    return out


def _pairwise_hh(n: int, seed: int, start: int = 0) -> list[dict]:
    """Anthropic-HH-style two-turn conversations; chosen has more "yes" than rejected (margin: difference / 6)."""
    out = []
    for rec in _kwise(n, 2, seed, start):
        conv = f"\n\nHuman: {rec['prompt']}\n\nAssistant: no\n\nHuman: again\n\nAssistant:"
        best, worst = (rec["responses"][i] for i in rec["ranking"])
        margin = (best.count("yes") - worst.count("yes")) / 6
        out.append({"chosen": f"{conv} {best}", "rejected": f"{conv} {worst}", "margin": margin})
    return out


def _setup(tmp_path: Path, records=_kwise, steps: int = 60, extra: tuple[str, ...] = ()) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train", records(200, 4, 1) if records is _kwise else records(300, 1)),
                       ("eval", records(40, 4, 2, 1000) if records is _kwise else records(60, 2, 1000))):  # fmt: skip
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    overrides = [
        f"run.root={tmp_path / 'runs'}", "run.name=t", "run.seed=0",
        f"reward.dataset.source={tmp_path / 'train.jsonl'}", f"reward.dataset.eval_source={tmp_path / 'eval.jsonl'}",
        f"reward.max_steps={steps}", "reward.batch_size=8", "reward.lr=3e-3", "reward.save_steps=20",
        "reward.logging_steps=10", "reward.norm_samples=8", "reward.norm_max_new_tokens=4", *extra,
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    make_fake_upstream(cfg.run_dir, cfg, "sft", tokenizer=make_tokenizer([_TEXT] * 20))
    return overrides


def _run(overrides: list[str]) -> int:
    from stages.reward import main

    return main(overrides)


def test_stage_kwise_learns_rankings_loads_and_skips_when_done(tmp_path):
    overrides = _setup(tmp_path, extra=("reward.eval_steps=30",))
    assert _run(overrides) == 0
    rd = tmp_path / "runs" / "t" / "reward"
    manifest = json.loads((rd / "manifest.json").read_text())
    m = manifest["metrics"]
    # held-out: 40 unseen prompts x C(4,2) = 240 pairs; chance is 0.5
    assert manifest["data"]["eval_pairs"] == 240
    assert m["pair_accuracy"] >= 0.9
    assert m["rank_correlation"] >= 0.8
    assert m["reward_chosen_mean"] > m["reward_rejected_mean"] + 1.0
    assert manifest["loss"].startswith("grouped")
    lines = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0] and all(math.isfinite(x) for x in losses)
    assert lines[-1]["step"] == 60 and lines[-1]["rm/accuracy"] == m["pair_accuracy"] and "val/loss" in lines[-1]
    during = [x for x in lines[:-1] if "rm/accuracy" in x]  # the Trainer's evaluations (grouped val loss too)
    assert [x["step"] for x in during] == [30, 60] and all("val/loss" in x for x in during)
    assert during[-1]["val/loss"] == pytest.approx(m["val_loss"], abs=1e-4)  # one loss, two code paths
    # reward statistics for PPO: on SFT-policy samples
    stats = json.loads((rd / "artifact" / "reward_stats.json").read_text())
    assert stats["n"] == 8 and stats["std"] > 0 and stats["source"] == "sft_samples"
    assert stats["mean"] == pytest.approx(m["reward_norm_mean"])
    hist = json.loads((rd / "artifact" / "eval_rewards.json").read_text())
    assert len(hist["chosen"]) == len(hist["rejected"]) == 40

    # the artifact is a plain HF sequence classifier that prefers the held-out best response
    rm = AutoModelForSequenceClassification.from_pretrained(rd / "artifact")
    tok = AutoTokenizer.from_pretrained(rd / "artifact")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    held = _kwise(40, 4, 2, 1000)
    best = [r["responses"][r["ranking"][0]] for r in held]
    worst = [r["responses"][r["ranking"][-1]] for r in held]
    prompts = [r["prompt"] for r in held]
    scorer = ScalarReward(rm, tok)
    wins = scorer.score_texts(prompts, best) > scorer.score_texts(prompts, worst)
    assert wins.float().mean().item() >= 0.95

    # done: a second run does nothing
    before = (rd / "manifest.json").read_text(), (rd / "artifact" / "model.safetensors").stat().st_mtime_ns
    assert _run(overrides) == 0
    assert ((rd / "manifest.json").read_text(), (rd / "artifact" / "model.safetensors").stat().st_mtime_ns) == before


def test_stage_pairwise_hh_with_trl_reward_trainer_and_margin(tmp_path):
    overrides = _setup(tmp_path, _pairwise_hh, steps=60, extra=("reward.margin=true",))
    assert _run(overrides) == 0
    manifest = json.loads((tmp_path / "runs" / "t" / "reward" / "manifest.json").read_text())
    assert manifest["loss"].startswith("pairwise") and manifest["data"]["eval_pairs"] == 60
    assert manifest["metrics"]["pair_accuracy"] >= 0.9
    assert "rank_correlation" not in manifest["metrics"]
    # multi-turn prompts cannot be sampled as single user messages: the statistics use the training responses
    assert manifest["reward_stats"]["source"] == "train_responses" and manifest["reward_stats"]["n"] == 8


class _Crash(RuntimeError):
    pass


def test_stage_killed_mid_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from transformers import TrainerCallback

    import stages.reward as stage

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 30:
                # a checkpoint whose save was cut off (no COMPLETE marker) must never be loaded
                (Path(args.output_dir) / "checkpoint-30").mkdir()
                raise _Crash("simulated kill at step 30")

    reference = _setup(tmp_path / "ref", steps=40)
    assert _run(reference) == 0
    ref_weights = load_file(tmp_path / "ref" / "runs" / "t" / "reward" / "artifact" / "model.safetensors")

    overrides = _setup(tmp_path / "crash", steps=40)
    original = stage._callbacks
    monkeypatch.setattr(stage, "_callbacks", lambda ctx, stopper: [*original(ctx, stopper), CrashAt()])
    with pytest.raises(_Crash):
        _run(overrides)
    rd = tmp_path / "crash" / "runs" / "t" / "reward"
    assert not (rd / "manifest.json").exists()
    assert sorted(p.name for p in (rd / "checkpoints").glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]
    monkeypatch.setattr(stage, "_callbacks", original)
    assert _run(overrides) == 0  # partial -> resumes from checkpoint-20 (checkpoint-30 is incomplete)
    weights = load_file(rd / "artifact" / "model.safetensors")
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)  # bit-identical on CPU
    steps = [json.loads(x)["step"] for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40, 40]  # lines after the resumed checkpoint were dropped, then rewritten


@pytest.mark.slow
def test_stage_sigterm_then_sigkill_then_resume_in_a_subprocess(tmp_path):
    overrides = _setup(tmp_path, steps=400, extra=("reward.save_steps=50",))
    env = child_env()
    cmd = [sys.executable, "-m", "stages.reward", *overrides]
    rd = tmp_path / "runs" / "t" / "reward"

    def start_then(sig: int, after_step: int) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            steps = [json.loads(x).get("step", 0) for x in rd.joinpath("metrics.jsonl").read_text().splitlines()] \
                if rd.joinpath("metrics.jsonl").exists() else []  # fmt: skip
            if steps and steps[-1] >= after_step:
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        return proc

    # SIGTERM: a checkpoint is saved at the step reached, exit code 128 + SIGTERM as in every stage, no manifest
    term = start_then(signal.SIGTERM, after_step=10)
    assert term.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in term.stderr.read()
    saved = StageDir(rd).latest_checkpoint()
    assert saved is not None and not (rd / "manifest.json").exists()
    # SIGKILL later on: whatever was being written is never resumed from
    start_then(signal.SIGKILL, after_step=int(saved.name.split("-")[1]) + 60)
    assert not (rd / "manifest.json").exists()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    assert json.loads((rd / "manifest.json").read_text())["metrics"]["steps"] == 400


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp.yaml", "zero2.yaml", "zero3.yaml"])
def test_stage_two_processes(tmp_path, launch):
    overrides = _setup(tmp_path, steps=40)
    # held-out records with a checker (task/answer), so the main process also runs the best-of-k check
    eval_path = tmp_path / "eval.jsonl"
    held = [json.loads(line) for line in eval_path.read_text().splitlines()]
    for r in held:
        r.update(task="yes", answer=r["responses"][r["ranking"][0]])
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in held))
    env = child_env()
    cmd = [*accelerate_launch(f"configs/accelerate/{launch}"), "-m", "stages.reward", *overrides]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rd = tmp_path / "runs" / "t" / "reward"
    manifest = json.loads((rd / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 40 and manifest["metrics"]["pair_accuracy"] >= 0.9
    bok = manifest["best_of_k"]
    assert bok["k"] == 8 and bok["tasks"]["all"]["n"] == len({r["prompt"] for r in held})
    assert AutoModelForSequenceClassification.from_pretrained(rd / "artifact").config.num_labels == 1


# ----------------------------------------------------------------------------- issue 17: diverged or untrained


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", float("nan")])
def test_non_finite_config_numbers_are_refused_naming_the_key(value):
    from pipeline.config import ConfigError
    from pipeline.config.run import RunConfig
    from pipeline.config.schema import from_dict

    with pytest.raises(ConfigError, match=r"reward\.dpo_beta must be a number other than NaN or inf"):
        from_dict(RunConfig, {"reward": {"dpo_beta": value}})  # as a YAML file's .nan reads

    with pytest.raises(ConfigError, match=r"reward\.dpo_beta must be a number other than NaN or inf"):
        load_config(None, ["reward.objective=dpo", f"reward.dpo_beta={value}"])
    with pytest.raises(ConfigError, match=r"sft\.lr must be a number other than NaN or inf"):
        load_config(None, [f"sft.lr={value}"])
    with pytest.raises(ConfigError, match=r"reward\.epochs must be > 0"):
        load_config(None, ["reward.epochs=0"])


def test_check_trained_refuses_no_step_and_non_finite_weights():
    from pipeline.runs import StageError
    from pipeline.training import check_trained

    model = torch.nn.Linear(2, 2)
    check_trained("reward", model, 3, "ckpts")  # finite, trained: no error
    with pytest.raises(StageError, match=r"reward: no optimizer step ran.*reward\.epochs"):
        check_trained("reward", model, 0, "ckpts")
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(StageError, match=r"reward: the weights are not finite after step 3 \(1 tensors: bias\).*"
                                         r"lower reward\.lr"):  # fmt: skip
        check_trained("reward", model, 3, "ckpts")


def test_stage_with_a_diverging_lr_fails_without_an_artifact_or_manifest(tmp_path, capsys):
    # 3 steps, no loss logged (logging_steps 10): only the weight check can see the divergence
    overrides = _setup(tmp_path, steps=3, extra=("reward.lr=1e12", "reward.save_steps=100"))
    assert _run(overrides) != 0
    err = capsys.readouterr().err
    assert "reward:" in err and "weights are not finite" in err and "reward.lr" in err
    rd = tmp_path / "runs" / "t" / "reward"
    assert not (rd / "manifest.json").exists() and not (rd / "artifact" / "model.safetensors").exists()
