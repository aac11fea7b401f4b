"""The implicit (DPO) reward model: loss, scoring paths, artifact, on-policy pairs, reward and PPO stages."""

from __future__ import annotations

import doctest
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import pipeline.reward.losses as losses
from pipeline.config import ConfigError, load_config
from pipeline.data.preferences import PreferenceGroup
from pipeline.lm import left_pad, sequence_logprobs, sequence_mask
from pipeline.reward import load_scorer
from pipeline.reward.data import add_reference_logprobs, dpo_rows
from pipeline.reward.implicit import ImplicitReward, load_implicit_reward, save_implicit_reward
from pipeline.reward.losses import chosen_nll, dpo_loss
from pipeline.reward.on_policy import on_policy_groups
from pipeline.reward.scorer import encode_prompt_response
from pipeline.runs import StageDir
from tests.helpers_artifacts import make_tiny_lm, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(["yes no yes no Answer question 1 2 3 4 5"] * 20)


def _pair(tok):
    """Two different tiny LMs: a 'trained' model and its reference."""
    return make_tiny_lm(tok, seed=1).eval(), make_tiny_lm(tok, seed=2).eval()


def test_doctests():
    assert doctest.testmod(losses).failed == 0  # dpo_loss and chosen_nll


def test_dpo_loss_by_hand_and_its_gradient_raises_chosen_over_rejected():
    logps = torch.tensor([-1.0, -2.0, -4.0, -1.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.5, -2.0, -2.0])
    loss, margin = dpo_loss(logps, ref, beta=0.5)
    # ratios 0.5, -0.5, -2, 1 -> margins 0.5 * (0.5 + 0.5) = 0.5 and 0.5 * (-2 - 1) = -1.5
    assert margin.tolist() == pytest.approx([0.5, -1.5])
    expected = (
        -(torch.nn.functional.logsigmoid(torch.tensor(0.5)) + torch.nn.functional.logsigmoid(torch.tensor(-1.5))) / 2
    )
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    g = logps.grad
    assert g[0] < 0 and g[2] < 0 and g[1] > 0 and g[3] > 0  # descent raises chosen, lowers rejected


class _Uniform(torch.nn.Module):
    """A 'language model' whose every next-token distribution is uniform over 60 tokens."""

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 60))


def test_chosen_nll_is_the_best_chosen_tokens_mean_nll_over_the_summed_positions():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    starts = torch.tensor([2, 2, 1, 4])
    assert sequence_mask(mask, starts).sum(1).tolist() == [3, 1, 3, 1]
    # the lengths count exactly the positions sequence_logprobs sums (each token log 1/60 here)
    summed = sequence_logprobs(_Uniform(), torch.randint(5, 50, mask.shape) * mask, mask, starts)
    assert summed.tolist() == pytest.approx((sequence_mask(mask, starts).sum(1) * -math.log(60)).tolist())

    logps = torch.tensor([-1.2, -2.0, -0.6, -1.0, -5.0, -1.0], requires_grad=True)
    lengths = torch.tensor([3, 1, 3, 1, 2, 2])
    best = torch.tensor([1.0, 1.0, 0.0])  # the third comparison's chosen response is not its group's best
    nll = chosen_nll(logps, lengths, best)
    assert nll.item() == pytest.approx((1.2 + 0.6) / (3 + 3))
    nll.backward()
    assert logps.grad.tolist() == pytest.approx([-1 / 6, 0.0, -1 / 6, 0.0, 0.0, 0.0])
    assert chosen_nll(logps, lengths, torch.zeros(3)).item() == 0.0


def test_encode_prompt_response_is_the_policy_view(tok):
    ids, start = encode_prompt_response(tok, "Answer 1", "yes")
    head = tok(tok.apply_chat_template([{"role": "user", "content": "Answer 1"}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False).input_ids  # fmt: skip
    assert ids[:start] == head and start == len(head)
    assert tok.decode(ids[start:]) == "yes<|end|>"  # the response ends with the end-of-turn token


def test_implicit_reward_is_zero_against_itself_and_the_text_and_id_paths_agree(tok):
    model, reference = _pair(tok)
    same = ImplicitReward(model, model, 0.1, tok)
    prompts, responses = ["Answer 1", "Answer 22", "Answer 3"], ["yes", "no no yes", "yes no"]
    assert torch.allclose(same.score_texts(prompts, responses), torch.zeros(3), atol=1e-6)

    rw = ImplicitReward(model, reference, 0.1, tok)
    text = rw.score_texts(prompts, responses, batch_size=3)  # the reward stage's and report's path
    assert torch.allclose(text, rw.score_texts(prompts, responses, batch_size=1), atol=1e-5)
    by_hand = []
    for p, r in zip(prompts, responses):
        ids, start = encode_prompt_response(tok, p, r)
        x = torch.tensor([ids])
        lp = [
            torch.log_softmax(m(x).logits[0, :-1], -1).gather(-1, x[0, 1:, None])[start - 1 :].sum()
            for m in (model, reference)
        ]
        by_hand.append(0.1 * float((lp[0] - lp[1]).detach()))
    assert text.tolist() == pytest.approx(by_hand, abs=1e-5) and all(abs(x) > 1e-3 for x in by_hand)

    # PPO's path: left-padded prompt ids + right-padded response ids (with <|end|>)
    enc = [encode_prompt_response(tok, p, r) for p, r in zip(prompts, responses)]
    q, qm = left_pad([ids[:s] for ids, s in enc], tok.pad_token_id)
    resp = [torch.tensor(ids[s:]) for ids, s in enc]
    width = max(len(x) for x in resp)
    r_ids = torch.stack([torch.cat([x, x.new_full((width - len(x),), tok.pad_token_id)]) for x in resp])
    r_mask = torch.stack([torch.arange(width) < len(x) for x in resp]).long()
    assert torch.allclose(rw.score_ids(q, qm, r_ids, r_mask), text, atol=1e-5)


def test_artifact_round_trip_through_load_reward_model(tmp_path, tok):
    model, reference = _pair(tok)
    ref_dir = tmp_path / "sft"
    reference.save_pretrained(ref_dir)
    tok.save_pretrained(ref_dir)
    art = tmp_path / "artifact"
    model.save_pretrained(art)
    tok.save_pretrained(art)
    save_implicit_reward(art, AutoModelForCausalLM.from_pretrained(ref_dir), 0.25, tok)
    assert json.loads((art / "implicit_reward.json").read_text())["beta"] == 0.25
    shutil.rmtree(ref_dir)  # the artifact is self-contained
    rw = load_scorer(str(art))
    assert isinstance(rw, ImplicitReward) and rw.beta == 0.25
    assert all(not p.requires_grad for p in rw.model.parameters())
    direct = ImplicitReward(model, reference, 0.25, tok)
    args = (["Answer 1", "Answer 2"], ["yes", "no"])
    assert torch.allclose(rw.score_texts(*args), direct.score_texts(*args), atol=1e-6)

    (art / "implicit_reward.json").write_text('{"kind": "dpo"}')
    with pytest.raises(ValueError, match="implicit_reward.json.*beta"):
        load_implicit_reward(art)


def test_dpo_rows_expand_every_comparison_with_reference_logprobs(tok):
    groups = [PreferenceGroup("Answer 1", ["yes", "no", "yes yes"], [2, 0, 1]),
              PreferenceGroup("Answer 2", ["no", "yes " * 80], [1, 0])]  # fmt: skip
    rows, kept = dpo_rows(tok, groups, max_length=40)
    assert kept == groups[:1] and len(rows) == 3  # C(3,2) comparisons; the group with an over-long response is dropped
    assert rows[0]["chosen_ids"] == encode_prompt_response(tok, "Answer 1", "yes yes")[0]
    assert rows[0]["rejected_ids"] == encode_prompt_response(tok, "Answer 1", "yes")[0]
    _, reference = _pair(tok)
    add_reference_logprobs(reference, rows, tok.pad_token_id, batch_size=2)
    for r in rows:  # batched and padded, the stored values are each response's own summed log-probs
        for side in ("chosen", "rejected"):
            x = torch.tensor([r[f"{side}_ids"]])
            lp = torch.log_softmax(reference(x).logits[0, :-1], -1).gather(-1, x[0, 1:, None])
            want = float(lp[r[f"{side}_start"] - 1 :].sum().detach())
            assert r[f"ref_{side}"] == pytest.approx(want, abs=1e-4)


def test_on_policy_groups_pair_right_over_wrong_by_the_checker(tok):
    policy = make_tiny_lm(tok).eval()
    meta = {"task": "add", "answer": "3", "id": "t-1"}
    groups = [PreferenceGroup("Answer 1", ["3", "4"], [0, 1], meta=meta),
              PreferenceGroup("Answer 1", ["3", "5"], [0, 1], meta=meta),  # a repeated prompt is sampled again
              PreferenceGroup("no checker", ["a", "b"], [0, 1])]  # fmt: skip
    out = on_policy_groups(policy, tok, groups, k=6, pairs_per_prompt=3, max_new_tokens=4, seed=0)
    again = on_policy_groups(policy, tok, groups, k=6, pairs_per_prompt=3, max_new_tokens=4, seed=0)
    assert [(g.responses, g.scores) for g in out] == [(g.responses, g.scores) for g in again]  # seeded
    assert out and all(g.prompt == "Answer 1" and g.meta == meta and g.ranking == [0, 1] for g in out)
    assert len(out) <= 2 * 3
    from pipeline.data.tasks import score_answer

    for g in out:
        assert score_answer(meta, g.responses[0]) == 1.0 > score_answer(meta, g.responses[1])
        assert g.scores == [score_answer(meta, r) for r in g.responses]
    assert on_policy_groups(policy, tok, groups[2:], k=6, pairs_per_prompt=3, max_new_tokens=4) == []


def test_reward_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match="reward.margin applies to objective=bradley_terry"):
        load_config(None, ["reward.objective=dpo", "reward.margin=true"])
    with pytest.raises(ConfigError, match="reward.dpo_beta must be > 0"):
        load_config(None, ["reward.dpo_beta=0"])
    with pytest.raises(ConfigError, match="reward.on_policy_samples must be >= 0"):
        load_config(None, ["reward.on_policy_samples=-1"])
    with pytest.raises(ConfigError, match="reward.on_policy_pairs must be >= 1"):
        load_config(None, ["reward.on_policy_pairs=0"])
    with pytest.raises(ConfigError, match="reward.dpo_nll_weight must be a number >= 0"):
        load_config(None, ["reward.objective=dpo", "reward.dpo_nll_weight=-1"])
    with pytest.raises(ConfigError, match="reward.dpo_nll_weight=1.0 applies to reward.objective=dpo only"):
        load_config(None, ["reward.dpo_nll_weight=1"])
    with pytest.raises(ConfigError, match="reward.dpo_nll_weight must be a number"):
        load_config(None, ["reward.objective=dpo", "reward.dpo_nll_weight=nan"])


# ----------------------------------------------------------------------------- stages


def test_reward_stage_dpo_learns_rankings_and_ppo_trains_against_it(tmp_path):
    from tests.test_reward import _kwise, _run, _setup

    dpo = ("reward.objective=dpo", "reward.dpo_beta=0.5", "reward.lr=1e-3", "reward.eval_steps=30")
    overrides = _setup(tmp_path, steps=60, extra=dpo)
    assert _run(overrides) == 0
    rd = tmp_path / "runs" / "t" / "reward"
    manifest = json.loads((rd / "manifest.json").read_text())
    assert manifest["loss"] == "DPO, implicit reward (beta 0.5)" and manifest["metrics"]["pair_accuracy"] >= 0.85
    assert (rd / "artifact" / "implicit_reward.json").is_file() and (rd / "artifact" / "reference").is_dir()
    lines = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert (
        any("train/accuracy" in x for x in lines) and lines[-1]["rm/accuracy"] == manifest["metrics"]["pair_accuracy"]
    )
    rw = load_scorer(str(rd / "artifact"))
    held = _kwise(40, 4, 2, 1000)
    best = [r["responses"][r["ranking"][0]] for r in held]
    worst = [r["responses"][r["ranking"][-1]] for r in held]
    prompts = [r["prompt"] for r in held]
    assert (rw.score_texts(prompts, best) > rw.score_texts(prompts, worst)).float().mean() >= 0.9
    before = (rd / "manifest.json").read_text()
    assert _run(overrides) == 0 and (rd / "manifest.json").read_text() == before  # done: skipped


def test_reward_stage_nll_term_raises_the_chosen_responses_reward(tmp_path):
    from tests.test_reward import _kwise, _run, _setup

    held = _kwise(40, 4, 2, 1000)
    prompts, best = [r["prompt"] for r in held], [r["responses"][r["ranking"][0]] for r in held]
    mean_best, last_nll = {}, {}
    for weight in ("0", "1.0"):
        dpo = ("reward.objective=dpo", "reward.dpo_beta=0.5", "reward.lr=1e-3", f"reward.dpo_nll_weight={weight}")
        assert _run(_setup(tmp_path / weight, steps=30, extra=dpo)) == 0
        rd = tmp_path / weight / "runs" / "t" / "reward"
        lines = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
        nll = [x["train/chosen_nll"] for x in lines if "train/chosen_nll" in x]
        assert len(nll) == 3  # logged every 10 steps, with or without the term in the loss
        last_nll[weight] = nll[-1]
        rw = load_scorer(str(rd / "artifact"))
        mean_best[weight] = rw.score_texts(prompts, best).mean().item()
        manifest = json.loads((rd / "manifest.json").read_text())
        assert ("chosen NLL" in manifest["loss"]) == (weight != "0")
    assert last_nll["1.0"] < last_nll["0"]  # the term lowers the chosen responses' NLL ...
    assert mean_best["1.0"] > mean_best["0"]  # ... and raises the held-out best responses' implicit reward


def test_ppo_stage_scores_with_an_implicit_reward_model_with_group_or_gae_advantages(tmp_path, capsys):
    from stages.ppo import main
    from tests.test_ppo import stage_setup

    group = ("ppo.advantage=group", "ppo.samples_per_prompt=2")
    cfg, args = stage_setup(tmp_path, extra=group)
    art = StageDir.of(cfg.run_dir, "reward").artifact
    sft = StageDir.of(cfg.run_dir, "sft").artifact
    tok = make_tokenizer()
    for f in art.iterdir():  # replace the fake classifier by an implicit reward model on the SFT model
        if f.name not in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            f.unlink() if f.is_file() else shutil.rmtree(f)
    make_tiny_lm(tok, seed=7).save_pretrained(art)  # the fake SFT model is seed 0
    save_implicit_reward(art, AutoModelForCausalLM.from_pretrained(sft), 0.1, tok)
    # the frozen pair in bf16; ppo.reward_norm=standardize (the default) does not apply to an implicit reward,
    # whose rewards are used as they are: not an error, and not silently unapplied either (the stage says so)
    bf16_args = [*args, "ppo.reward_norm=standardize", "ppo.frozen_device=cpu", "ppo.reference_dtype=bfloat16"]
    assert main(bf16_args) == 0
    assert "ppo.reward_norm=standardize normalises a scalar reward model only" in capsys.readouterr().err
    bf16 = json.loads(StageDir.of(cfg.run_dir, "ppo").manifest_path.read_text())["metrics"]
    shutil.rmtree(StageDir.of(cfg.run_dir, "ppo").root)
    assert main(args) == 0
    manifest = json.loads(StageDir.of(cfg.run_dir, "ppo").manifest_path.read_text())
    m = manifest["metrics"]
    assert all(torch.isfinite(torch.tensor(m[k])) for k in ("reward_mean", "sft_reward_mean", "kl", "train_reward"))
    assert m["sft_reward_mean"] != 0.0  # scored by the trained LM against its reference, not a zero stand-in
    assert bf16["sft_reward_mean"] == pytest.approx(m["sft_reward_mean"], abs=0.05)  # bf16 scores close to fp32
    assert manifest["rm_vs_checker"] is not None  # the report's reward-model-vs-checker section
    # the controls (pipeline/analysis/controls.py): a 95% interval around each accuracy, and the DPO policy itself
    for key in ("checker_accuracy", "sft_checker_accuracy", "dpo_policy_checker_accuracy"):
        low, high = m[f"{key}_ci95"]
        assert 0.0 <= low <= m[key] <= high <= 1.0, key
    assert m["kl_coef_over_dpo_beta"] == pytest.approx(cfg.ppo.kl_coef / 0.1)
    assert {c["name"] for c in manifest["controls"]["controls"]} >= {"SFT model (greedy)", "DPO policy"}

    _, gae_args = stage_setup(tmp_path / "gae")
    gae_art = StageDir.of(load_config(None, gae_args).run_dir, "reward").artifact
    shutil.rmtree(gae_art)
    shutil.copytree(art, gae_art)
    # GAE against an implicit reward: the value model starts from the policy (the SFT model) with a new scalar head
    from pipeline.rl.components import load_models

    sft_gae = StageDir.of(load_config(None, gae_args).run_dir, "sft").artifact
    models = load_models(sft_gae, gae_art, critic=True)
    assert models.value_model is not None and models.scorer.kind == "implicit"
    policy_sd = AutoModelForCausalLM.from_pretrained(sft_gae).state_dict()
    value_sd = models.value_model.state_dict()
    backbone = [k for k in value_sd if k.startswith("transformer.")]
    assert backbone and all(torch.equal(value_sd[k], policy_sd[k]) for k in backbone)
    assert value_sd["score.weight"].shape[0] == 1
    assert main(gae_args) == 0  # the whole stage runs: DPO's implicit reward, GAE with that critic
    m = json.loads(StageDir.of(load_config(None, gae_args).run_dir, "ppo").manifest_path.read_text())["metrics"]
    assert all(torch.isfinite(torch.tensor(m[k])) for k in ("reward_mean", "kl", "train_reward"))
    assert "dpo_policy_checker_accuracy" in m


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp.yaml", "zero3.yaml"])
def test_reward_stage_dpo_with_on_policy_pairs_two_processes(tmp_path, launch):
    import subprocess

    from tests.helpers_launch import accelerate_launch, child_env
    from tests.test_reward import REPO, _setup

    extra = (
        "reward.objective=dpo",
        "reward.dpo_beta=0.5",
        "reward.lr=1e-3",
        "reward.on_policy_samples=2",
        "reward.dpo_nll_weight=1.0",
    )  # fmt: skip  (as configs/tiny.yaml)
    overrides = _setup(tmp_path, steps=30, extra=extra)
    for name in ("train", "eval"):  # a checker (task/answer) on every record, so on-policy pairs can be drawn
        path = tmp_path / f"{name}.jsonl"
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        for r in recs:
            r.update(task="yes", answer=r["responses"][r["ranking"][0]])
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cmd = [*accelerate_launch(f"configs/accelerate/{launch}"), "-m", "stages.reward", *overrides]
    done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rd = tmp_path / "runs" / "t" / "reward"
    manifest = json.loads((rd / "manifest.json").read_text())
    pairs = (rd / "on_policy_pairs.jsonl").read_text().splitlines()
    assert manifest["data"]["on_policy_pairs"] == len(pairs) > 0 and manifest["metrics"]["steps"] == 30
    assert manifest["loss"].endswith("chosen NLL (RPO)") and manifest["metrics"]["pair_accuracy"] >= 0.8
    rw = load_scorer(str(rd / "artifact"))
    assert isinstance(rw, ImplicitReward)
