"""PPO rollouts, masks, the trainer and the stage on tiny random GPT-2 models (CPU)."""

import copy
import doctest
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

import pipeline.lm
import pipeline.rl.gae
import pipeline.rl.kl
import pipeline.rl.rollout
import pipeline.rl.scores
from pipeline.checkpoint import ALLOW_PICKLE_KEY
from pipeline.config import ConfigError, PPOStageConfig
from pipeline.lm import (
    Samples,
    concat_inputs,
    disable_dropout,
    fuse_activations,
    left_pad,
    response_logits,
    response_logprobs,
    truncate_after_stop,
)
from pipeline.reward import ProgrammaticReward, ScalarReward
from pipeline.reward.scalar import sequence_scores, token_scores
from pipeline.rl.gae import masked_mean
from pipeline.rl.losses import policy_loss, value_loss
from pipeline.rl.rollout import PolicyAndValue
from pipeline.rl.trainer import PPOTrainer, sampling_matches_training
from pipeline.runs import StageDir
from pipeline.training import Interrupted
from tests.helpers_launch import accelerate_launch, child_env

V, PAD, STOP, TARGET = 16, 0, 1, 7


@pytest.fixture(autouse=True)
def _one_thread_and_clean_env():
    """Tiny models: one thread is fastest, and far faster than two on a shared, busy machine. In-process
    Accelerators set ACCELERATE_* variables (e.g. ACCELERATE_USE_CPU) that later launches would inherit."""
    n = torch.get_num_threads()
    env = dict(os.environ)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    for k in [k for k in os.environ if k.startswith("ACCELERATE_") and k not in env]:
        del os.environ[k]


def tiny_models(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, pad_token_id=PAD)
    policy = GPT2LMHeadModel(cfg)
    value = GPT2ForSequenceClassification(GPT2Config(**{**cfg.to_dict(), "num_labels": 1}))
    for m in (policy, value):
        disable_dropout(m)
    return policy, value


def count_target(query_ids, query_mask, response_ids, response_mask):
    """Programmatic reward: how many times TARGET appears in the response."""
    return ((response_ids == TARGET) & response_mask.bool()).sum(1).float()


def make_trainer(
    ref_equals_policy=True, score_fn=count_target, reward_model=None, reward_stats=None, stop_ids=(STOP,), **overrides
):
    cfg = PPOStageConfig(
        **{
            "max_new_tokens": 6,
            "rollout_batch_size": 8,
            "minibatch_size": 4,
            "ppo_epochs": 2,
            "steps": 4,
            "lr": 1e-3,
            "kl_coef": 0.05,
            "missing_eos_penalty": 0.0,
            "ckpt_interval": 2,
            "log_interval": 100,
            **overrides,
        }
    )
    policy, value = tiny_models()
    ref = copy.deepcopy(policy) if ref_equals_policy else tiny_models(seed=1)[0]
    if reward_model is not None:
        scorer = ScalarReward(reward_model, stop_ids=list(stop_ids), pad_id=PAD)
    else:
        scorer = ProgrammaticReward(score_fn)
    return PPOTrainer(
        cfg,
        Accelerator(cpu=True),
        policy,
        None if cfg.advantage == "group" else value,
        ref,
        scorer,
        list(stop_ids),
        PAD,
        reward_stats,
        seed=0,
    )


PROMPTS = [[3, 4, 5], [6, 2], [9, 10, 11, 12, 13], [4], [5, 5, 5, 5], [8, 9], [2, 3, 4, 5, 6, 7], [12]]


def test_doctests():
    for mod in (pipeline.lm, pipeline.rl.gae, pipeline.rl.kl, pipeline.rl.rollout, pipeline.rl.scores):
        assert doctest.testmod(mod).failed == 0


def test_truncate_after_stop_masks_everything_after_the_first_stop():
    ids = torch.tensor([[4, 1, 5, 1], [1, 4, 4, 4], [4, 4, 4, 4]])
    out, mask, ended = truncate_after_stop(ids, [STOP], PAD)
    assert out.tolist() == [[4, 1, 0, 0], [1, 0, 0, 0], [4, 4, 4, 4]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


def test_left_padding_invariance_of_logprobs_values_and_scores():
    policy, value = tiny_models()
    response = [[4, 9, 1, 0], [7, 7, 7, 7]]
    resp = torch.tensor(response)
    rmask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    short = [3, 4]
    # alone: the short prompt has no padding
    q1, m1 = left_pad([short], PAD)
    # in a batch beside a much longer prompt: 6 columns of left padding
    q2, m2 = left_pad([short, [5, 6, 7, 8, 9, 10, 11, 12]], PAD)
    lp1 = response_logprobs(policy, q1, m1, resp[:1], rmask[:1])
    lp2 = response_logprobs(policy, q2, m2, resp, rmask)
    torch.testing.assert_close(lp1[0], lp2[0], atol=1e-5, rtol=0)
    P1, P2 = q1.shape[1], q2.shape[1]
    v1 = token_scores(value, q1, m1, resp[:1], rmask[:1])[:, P1 - 1 : P1 - 1 + 4]
    v2 = token_scores(value, q2, m2, resp, rmask)[:, P2 - 1 : P2 - 1 + 4]
    torch.testing.assert_close(v1[0] * rmask[0], v2[0] * rmask[0], atol=1e-5, rtol=0)
    s1 = sequence_scores(value, q1, m1, resp[:1], rmask[:1])
    s2 = sequence_scores(value, q2, m2, resp, rmask)
    torch.testing.assert_close(s1[0], s2[0], atol=1e-5, rtol=0)
    # the PolicyAndValue module used in training agrees
    lp3, v3, _ = PolicyAndValue(policy, value)(q2, m2, resp, rmask)
    torch.testing.assert_close(lp3 * rmask, lp2, atol=1e-6, rtol=0)
    torch.testing.assert_close(v3, v2, atol=1e-6, rtol=0)


def test_fused_activation_gives_the_same_model():
    policy, _ = tiny_models()
    ids = torch.randint(0, V, (2, 9))
    before = policy(input_ids=ids).logits
    assert fuse_activations(policy) == 2  # one per block
    torch.testing.assert_close(policy(input_ids=ids).logits, before, atol=1e-5, rtol=0)


def test_sequence_score_is_the_head_at_the_last_response_token():
    _, value = tiny_models()
    q, m = left_pad([[3, 4, 5]], PAD)
    resp, rmask = torch.tensor([[6, 1, 0, 0]]), torch.tensor([[1, 1, 0, 0]])
    # the HF model on the unpadded sequence 3 4 5 6 1 scores its last token
    expected = value(input_ids=torch.tensor([[3, 4, 5, 6, 1]])).logits[0, 0]
    torch.testing.assert_close(sequence_scores(value, q, m, resp, rmask)[0], expected, atol=1e-5, rtol=0)


def test_padding_after_the_end_never_enters_a_loss_or_statistic():
    policy, value = tiny_models()
    model = PolicyAndValue(policy, value)
    q, qm = left_pad([[3, 4, 5], [6]], PAD)
    resp = torch.tensor([[4, 1, 0, 0], [5, 6, 7, 8]])
    rmask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    old_lp = torch.tensor([[-2.0, -2.5, 0.0, 0.0], [-2.0, -3.0, -2.2, -2.1]])
    old_v = torch.tensor([[0.1, 0.2, 0.0, 0.0], [0.3, -0.1, 0.0, 0.2]])
    adv = torch.tensor([[1.0, -0.5, 0.0, 0.0], [0.5, 0.2, -1.0, 2.0]])
    ret = torch.tensor([[0.4, 0.1, 0.0, 0.0], [0.2, 0.3, 0.1, -0.3]])

    def losses(resp, old_lp, old_v, adv, ret):
        model.zero_grad()
        lp, v, ent = model(q, qm, resp, rmask, with_entropy=True)
        pg, pgs = policy_loss(lp, old_lp, adv, rmask, 0.2)
        vf, vfs = value_loss(v, old_v, ret, rmask, 0.2)
        loss = pg + 0.1 * vf - 0.01 * masked_mean(ent, rmask)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return loss.detach(), pgs["clipfrac"], pgs["approx_kl"], vfs["vf_clipfrac"], grads

    base = losses(resp, old_lp, old_v, adv, ret)
    pad = ~rmask.bool()
    garbage = losses(
        torch.where(pad, torch.full_like(resp, 9), resp),
        torch.where(pad, torch.full_like(old_lp, 50.0), old_lp),
        torch.where(pad, torch.full_like(old_v, -80.0), old_v),
        torch.where(pad, torch.full_like(adv, 1e4), adv),
        torch.where(pad, torch.full_like(ret, 1e3), ret),
    )
    for a, b in zip(base, garbage):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_rollout_masks_and_kl_zero_when_policy_is_reference():
    tr = make_trainer()
    q, qm = left_pad(PROMPTS, PAD)
    ro = tr.rollout(q, qm)
    B, T = ro.response_ids.shape
    assert B == 8 and T <= 6
    # logprobs, values and the reference are 0 after the end of each response
    pad = ~ro.response_mask.bool()
    assert ro.logprobs[pad].abs().max() == 0 if pad.any() else True
    assert ro.values[pad].abs().max() == 0 if pad.any() else True
    assert (ro.response_ids[pad] == PAD).all()
    assert torch.equal(ro.ended, (ro.response_ids == STOP).any(1))
    # the reference is a copy of the policy: the KL penalty is 0 up to float rounding (the old log-probs come from
    # the decode loop's logits, the reference's from a forward pass of the whole sequence)
    torch.testing.assert_close(ro.logprobs, ro.ref_logprobs, atol=1e-5, rtol=0)
    stats = tr.update(ro)
    assert abs(stats["kl"]) < 1e-4 and abs(stats["non_score_reward"]) < 1e-5
    torch.testing.assert_close(ro.scores, count_target(None, None, ro.response_ids, ro.response_mask))


def test_logged_entropy_is_the_sampling_policys_and_the_epochs_compute_none(monkeypatch):
    """The entropy statistic is the sampling distribution's (the decode loop's): the masked mean of
    H(softmax(logits / temperature)) over response tokens. The PPO epochs compute no entropy unless a bonus trains."""
    tr = make_trainer(temperature=0.7)
    q, qm = left_pad(PROMPTS, PAD)
    ro = tr.rollout(q, qm)
    with torch.no_grad():
        logits = response_logits(tr.unwrapped.policy, q, qm, ro.response_ids, ro.response_mask, 0.7)
        manual = -(F.log_softmax(logits, -1).exp() * F.log_softmax(logits, -1)).sum(-1)
    mask = ro.response_mask.bool()
    torch.testing.assert_close(ro.entropy[mask], manual[mask])
    assert (ro.entropy[~mask] == 0).all()
    calls = []
    real = pipeline.rl.rollout.entropy_from_logits
    monkeypatch.setattr(pipeline.rl.rollout, "entropy_from_logits", lambda x: calls.append(x.requires_grad) or real(x))
    stats = tr.update(ro)
    assert calls == []  # no (B, T, V) softmax in the epochs without an entropy bonus
    assert stats["entropy"] == pytest.approx(manual[mask].mean().item(), rel=1e-6)
    bonus = make_trainer(temperature=0.7, entropy_coef=0.01)
    bonus.update(bonus.rollout(q, qm))
    assert calls == [True] * 4  # one per minibatch; the rollout's statistic came with the samples


def test_response_logits_at_temperature_one_are_the_models_logits():
    policy, _ = tiny_models()
    q, qm = left_pad(PROMPTS[:3], PAD)
    r = torch.tensor([[4, 5, 6], [7, 8, 1], [9, 1, 1]])
    rm = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    ids, am, pos = concat_inputs(q, qm, r, rm)
    full = policy(input_ids=ids, attention_mask=am, position_ids=pos).logits
    P = q.shape[1]
    torch.testing.assert_close(response_logits(policy, q, qm, r, rm), full[:, P - 1 : P - 1 + 3], atol=1e-6, rtol=0)
    torch.testing.assert_close(response_logits(policy, q, qm, r, rm, 2.0), full[:, P - 1 : P - 1 + 3] / 2.0)


def _padded_batch():
    q, qm = left_pad([[3, 4], [5, 6, 7, 8, 9], [10, 11, 12]], PAD)
    r = torch.tensor([[4, 5, 6, 7], [7, 8, 1, 1], [9, 1, 1, 1]])
    rm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    return q, qm, r, rm


@pytest.mark.parametrize("start", [0, 4])
def test_lean_gpt2_forward_is_hugging_faces_bit_for_bit_from_start(start):
    """gpt2_hidden_states(start=s) equals the backbone's own forward at every real position from s on (the last
    block runs those rows only), and its gradients match those of the same loss through Hugging Face's forward."""
    policy, _ = tiny_models()
    policy.train()
    q, qm, r, rm = _padded_batch()
    ids, am, pos = concat_inputs(q, qm, r, rm)
    assert pipeline.lm.lean_forward_applies(policy) and pipeline.lm.lean_forward_applies(policy.transformer)
    hf = policy.transformer(input_ids=ids, attention_mask=am, position_ids=pos).last_hidden_state[:, start:]
    lean = pipeline.lm.gpt2_hidden_states(policy.transformer, ids, am, pos, start=start)
    real = am[:, start:].bool()
    assert lean.shape == hf.shape
    torch.testing.assert_close(lean[real], hf[real], atol=1e-6, rtol=0)
    weights = torch.randn(hf.shape)
    grads = []
    for out in (hf, lean):
        policy.zero_grad()
        (out * weights * real[..., None]).sum().backward()
        grads.append([p.grad.clone() for p in policy.transformer.parameters()])
    for g_hf, g_lean in zip(*grads):
        torch.testing.assert_close(g_lean, g_hf, atol=1e-6, rtol=1e-5)


def test_lean_forward_is_only_for_plain_sdpa_gpt2_and_the_fallback_agrees():
    policy, value = tiny_models()
    eager = GPT2LMHeadModel(GPT2Config(**{**policy.config.to_dict(), "_attn_implementation": "eager"}))
    eager.load_state_dict(policy.state_dict())
    eager.config._attn_implementation = "eager"
    disable_dropout(eager)
    assert not pipeline.lm.lean_forward_applies(eager)
    assert not pipeline.lm.lean_forward_applies(torch.nn.Linear(2, 2))
    for every_n_layers in (1, 2):
        checkpointed = copy.deepcopy(policy)
        checkpointed.activation_checkpointing_enable(every_n_layers=every_n_layers)
        assert not pipeline.lm.lean_forward_applies(checkpointed)  # the lean forward would skip the checkpointing
    q, qm, r, rm = _padded_batch()
    m = rm.bool()
    torch.testing.assert_close(
        response_logits(eager, q, qm, r, rm)[m], response_logits(policy, q, qm, r, rm)[m], atol=1e-5, rtol=0
    )
    # token_scores from a start position is the full scores' slice, on the lean path and on the fallback
    P = q.shape[1]
    full = token_scores(value, q, qm, r, rm)
    torch.testing.assert_close(token_scores(value, q, qm, r, rm, start=P - 1), full[:, P - 1 :], atol=1e-6, rtol=0)
    eager_value = GPT2ForSequenceClassification(GPT2Config(**value.config.to_dict()))
    eager_value.load_state_dict(value.state_dict())
    eager_value.config._attn_implementation = "eager"
    disable_dropout(eager_value)
    assert not pipeline.lm.lean_forward_applies(eager_value.transformer)
    real = torch.cat([qm, rm], 1)[:, P - 1 :].bool()
    torch.testing.assert_close(
        token_scores(eager_value, q, qm, r, rm, start=P - 1)[real], full[:, P - 1 :][real], atol=1e-5, rtol=0
    )
    # a start outside the inputs is an error, not an empty or wrapped-around slice
    ids, am, pos = concat_inputs(q, qm, r, rm)
    for bad in (-1, ids.shape[1]):
        with pytest.raises(ValueError, match="start="):
            pipeline.lm.gpt2_hidden_states(policy.transformer, ids, am, pos, start=bad)


def test_first_minibatch_has_ratio_one_and_later_ones_move():
    tr = make_trainer()
    q, qm = left_pad(PROMPTS, PAD)
    ro = tr.rollout(q, qm)
    tr.update(ro)
    first = tr.minibatch_stats[0]
    assert abs(first["ratio"] - 1.0) < 1e-6
    assert first["approx_kl"] < 1e-12
    assert first["clipfrac"] == 0.0
    assert len(tr.minibatch_stats) == 2 * 2  # ppo_epochs x minibatches
    assert tr.minibatch_stats[-1]["approx_kl"] > 0


def test_group_advantage_samples_each_prompt_in_a_row_and_learns():
    tr = make_trainer(advantage="group", samples_per_prompt=4, rollout_batch_size=8, minibatch_size=4)
    q, qm = tr._prompt_batch(PROMPTS, list(range(len(PROMPTS))))
    # 8 responses = 2 prompts x 4 samples, consecutive rows; the cursor moves by 2 prompts
    expected, _ = left_pad([PROMPTS[0]] * 4 + [PROMPTS[1]] * 4, PAD)
    assert torch.equal(q, expected) and tr.cursor == 2
    ro = tr.rollout(q, qm)
    tr.update(ro)
    # no critic: only the policy is trained and checkpointed
    assert tr.unwrapped.value_model is None and len(tr.optimizer.param_groups) == 1
    assert all(k.startswith("policy.") for k in tr.unwrapped.state_dict())
    # every token of a response carries its leave-one-out advantage
    assert ro.advantages is not None
    for i in range(len(ro)):
        row = ro.advantages[i][ro.response_mask[i].bool()]
        assert torch.allclose(row, row[0].expand_as(row))
    torch.manual_seed(0)
    tr = make_trainer(
        advantage="group", samples_per_prompt=4, steps=6, rollout_batch_size=16, minibatch_size=8, ppo_epochs=4,
        lr=1e-2, kl_coef=0.01,
    )  # fmt: skip
    rewards = [h["ppo/reward"] for h in tr.fit([[2 + (i % 10), 3 + (i % 7)] for i in range(64)])]
    assert sum(rewards[-2:]) / 2 > 2 * max(sum(rewards[:2]) / 2, 0.3), rewards


def test_group_advantage_gives_tied_samples_no_advantage_and_ranks_distinct_prompts():
    # every sample of a prompt scores the same: no signal, whatever the responses' lengths (no mean shift)
    tr = make_trainer(
        advantage="group", samples_per_prompt=4, rollout_batch_size=8, minibatch_size=4,
        score_fn=lambda q, qm, r, rm: q[:, -1].float(),
    )  # fmt: skip
    q, qm = tr._prompt_batch(PROMPTS, list(range(len(PROMPTS))))
    torch.manual_seed(5)  # a draw with responses of several lengths
    ro = tr.rollout(q, qm)
    assert ro.response_mask.sum(1).unique().numel() > 1  # responses of several lengths
    stats = tr.update(ro)
    assert ro.advantages is not None and ro.advantages.abs().max() == 0
    assert "value_loss" not in stats and "explained_variance" not in stats  # no critic, no value statistics
    # two processes: each rank takes its own prompts, each repeated in consecutive rows
    from types import SimpleNamespace

    batches = []
    for rank in (0, 1):
        tr = make_trainer(advantage="group", samples_per_prompt=2, rollout_batch_size=4, minibatch_size=2)
        tr.accelerator = SimpleNamespace(process_index=rank, num_processes=2)
        for _ in range(2):
            q, qm = tr._prompt_batch(PROMPTS, list(range(len(PROMPTS))))
            batches.append((rank, [tuple(r[m.bool()].tolist()) for r, m in zip(q, qm)]))
        assert tr.cursor == 8  # 2 steps x 2 prompts x 2 processes
    seen = [rows[::2] for _, rows in batches]
    assert all(rows[0::2] == rows[1::2] for _, rows in batches)  # each prompt twice in a row
    assert sorted(p for rows in seen for p in rows) == sorted(tuple(p) for p in PROMPTS)  # every prompt once


def test_group_advantage_config_errors():
    with pytest.raises(ValueError, match="needs no value_model"):
        policy, value = tiny_models()
        cfg = PPOStageConfig(advantage="group", samples_per_prompt=2, rollout_batch_size=8, minibatch_size=4)
        PPOTrainer(cfg, Accelerator(cpu=True), policy, value, copy.deepcopy(policy), ProgrammaticReward(count_target),
                   [STOP], PAD)  # fmt: skip
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        PPOStageConfig(advantage="group")
    with pytest.raises(ConfigError, match="must divide ppo.rollout_batch_size=64"):
        PPOStageConfig(samples_per_prompt=3)
    with pytest.raises(ConfigError, match="samples_per_prompt must be >= 1, got 0"):
        PPOStageConfig(samples_per_prompt=0)


def test_reward_model_scores_prompt_response_and_end_token():
    _, rm = tiny_models(seed=3)
    tr = make_trainer(score_fn=None, reward_model=rm, missing_eos_penalty=1.0, reward_stats={"mean": 0.5, "std": 2.0})
    q, qm = left_pad(PROMPTS, PAD)
    ro = tr.rollout(q, qm)
    for i in range(len(PROMPTS)):
        resp = ro.response_ids[i][ro.response_mask[i].bool()].tolist()
        if not ro.ended[i]:
            resp = resp + [STOP]  # the reward model always sees a finished turn
        expected = rm(input_ids=torch.tensor([PROMPTS[i] + resp])).logits[0, 0]
        torch.testing.assert_close(ro.raw_scores[i], expected, atol=1e-5, rtol=0)
    # standardised by reward_stats (the default ppo.reward_norm), minus the penalty for responses that never ended
    torch.testing.assert_close(ro.scores, (ro.raw_scores - 0.5) / 2.0 - 1.0 * (~ro.ended).float())
    # the value model (initialised from a reward model) is put on the rewards' scale: (head - mean) / std
    raw_values = token_scores(tr.unwrapped.value_model, q, qm, ro.response_ids, ro.response_mask)
    P = q.shape[1]
    expected_values = (raw_values[:, P - 1 : P - 1 + ro.response_ids.shape[1]] - 0.5) / 2.0 * ro.response_mask
    torch.testing.assert_close(ro.values, expected_values, atol=1e-5, rtol=0)


def test_missing_eos_penalty_and_reward_normalisation():
    tr = make_trainer(score_fn=lambda q, qm, r, rm: torch.full((r.shape[0],), 3.0), missing_eos_penalty=1.5)
    q, qm = left_pad(PROMPTS, PAD)
    ro = tr.rollout(q, qm)
    expected = 3.0 - 1.5 * (~ro.ended).float()
    torch.testing.assert_close(ro.scores, expected)
    torch.testing.assert_close(tr.normalise(torch.tensor([3.0])), torch.tensor([3.0]))  # score_fn: left raw
    # with a reward model the raw score is centred (or standardised) by reward_stats.json, and so are the values
    _, rm = tiny_models(seed=3)
    for norm, expected, scale in (("center", 2.0, 1.0), ("standardize", 1.0, 2.0), ("none", 3.0, 1.0)):
        tr = make_trainer(score_fn=None, reward_model=rm, reward_stats={"mean": 1.0, "std": 2.0}, reward_norm=norm)
        torch.testing.assert_close(tr.normalise(torch.tensor([3.0])), torch.tensor([expected]))
        shift = 0.0 if norm == "none" else 1.0
        assert (tr.unwrapped.value_shift, tr.unwrapped.value_scale) == (shift, scale)


def test_rewards_are_standardised_with_the_reward_stats_by_default():
    assert PPOStageConfig().reward_norm == "standardize"
    _, rm = tiny_models(seed=3)
    m, s = 0.7, 2.5
    tr = make_trainer(score_fn=None, reward_model=rm, reward_stats={"mean": m, "std": s})
    # the reward stage's statistics map to mean 0 and scale 1: m -> 0, m + s -> 1, m - 2s -> -2
    torch.testing.assert_close(tr.normalise(torch.tensor([m, m + s, m - 2 * s])), torch.tensor([0.0, 1.0, -2.0]))
    assert (tr.unwrapped.value_shift, tr.unwrapped.value_scale) == (m, s)
    # a scorer that is not normalised (a function here; the implicit reward, the checker) is used as it is
    tr = make_trainer(reward_stats={"mean": m, "std": s})
    torch.testing.assert_close(tr.normalise(torch.tensor([m, 3.0])), torch.tensor([m, 3.0]))


def test_reward_clip_bounds_the_normalised_score_before_the_missing_eos_penalty():
    # raw 7 with mean 1, std 2: normalised (7 - 1) / 2 = 3, clipped to 1.5, minus 0.5 where the response did not end
    _, rm = tiny_models(seed=3)
    tr = make_trainer(score_fn=lambda q, qm, r, m: torch.full((r.shape[0],), 7.0), reward_clip=1.5,
                      missing_eos_penalty=0.5)  # fmt: skip
    q, qm = left_pad(PROMPTS, PAD)
    ro = tr.rollout(q, qm)
    torch.testing.assert_close(ro.scores, 1.5 - 0.5 * (~ro.ended).float())  # a function's score: no normalisation
    tr = make_trainer(score_fn=None, reward_model=rm, reward_stats={"mean": 1.0, "std": 2.0}, reward_clip=1.5)
    torch.testing.assert_close(tr.normalise(torch.tensor([7.0])), torch.tensor([3.0]))  # logged unclipped
    with pytest.raises(ConfigError, match="ppo.reward_clip must be >= 0"):
        PPOStageConfig(reward_clip=-1.0)


def test_only_the_end_of_turn_token_ends_a_response():
    EOT = 2  # stands for <|endoftext|>: it stops generation, but only <|end|> (STOP) ends a turn
    _, rm = tiny_models(seed=3)
    tr = make_trainer(score_fn=None, reward_model=rm, reward_stats={"mean": 0.0, "std": 1.0},
                      missing_eos_penalty=1.0, stop_ids=(STOP, EOT))  # fmt: skip
    sampled = torch.tensor([[4, 5, STOP, 6], [4, EOT, 6, 6], [4, 5, 6, 7], [EOT, STOP, 0, 0]])
    tr.sample = lambda policy, q, qm: Samples(*truncate_after_stop(sampled, [STOP, EOT], PAD))
    q, qm = left_pad(PROMPTS[:4], PAD)
    ro = tr.rollout(q, qm)
    assert ro.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ro.ended.tolist() == [True, False, False, False]
    # the reward model reads each response closed by <|end|>, after <|endoftext|> too
    for i, resp in enumerate([[4, 5, STOP], [4, EOT, STOP], [4, 5, 6, 7, STOP], [EOT, STOP]]):
        expected = rm(input_ids=torch.tensor([PROMPTS[i] + resp])).logits[0, 0]
        torch.testing.assert_close(ro.raw_scores[i], expected, atol=1e-5, rtol=0)
    # and the penalty applies to every response that did not end with <|end|>
    torch.testing.assert_close(ro.scores, ro.raw_scores - torch.tensor([0.0, 1.0, 1.0, 1.0]))


def test_critic_warmup_keeps_the_policy_bit_identical_and_trains_the_value_model():
    tr = make_trainer(critic_warmup_steps=2, steps=3, missing_eos_penalty=1.0)
    policy0 = copy.deepcopy(tr.unwrapped.policy.state_dict())
    value0 = copy.deepcopy(tr.unwrapped.value_model.state_dict())
    order = list(range(len(PROMPTS)))
    for _ in range(2):
        stats = tr.train_step(*tr._prompt_batch(PROMPTS, order))
    policy = tr.unwrapped.policy.state_dict()
    assert all(torch.equal(policy[k], policy0[k]) for k in policy0)  # bit-identical after 2 warm-up steps
    assert any(not torch.equal(v, value0[k]) for k, v in tr.unwrapped.value_model.state_dict().items())
    assert stats["value_loss"] > 0 and "policy_loss" in stats  # the policy's loss is computed, not trained
    # the first step after the warm-up trains the policy, whose Adam starts afresh (its moments were still 0)
    tr.train_step(*tr._prompt_batch(PROMPTS, order))
    assert any(not torch.equal(v, policy0[k]) for k, v in tr.unwrapped.policy.state_dict().items())
    opt = tr.optimizer.optimizer  # the torch AdamW inside accelerate's wrapper
    policy_group, value_group = opt.param_groups
    assert {float(opt.state[p]["step"]) for p in policy_group["params"]} == {tr.updates_per_step}
    assert {float(opt.state[p]["step"]) for p in value_group["params"]} == {3 * tr.updates_per_step}


def test_new_ppo_keys_config_errors():
    with pytest.raises(ConfigError, match="critic_warmup_steps needs a critic"):
        PPOStageConfig(advantage="group", samples_per_prompt=2, critic_warmup_steps=1)
    with pytest.raises(ConfigError, match="critic_warmup_steps=100 must be < ppo.steps=100"):
        PPOStageConfig(critic_warmup_steps=100)
    with pytest.raises(ConfigError, match="critic_warmup_steps must be >= 0"):
        PPOStageConfig(critic_warmup_steps=-1)
    for bad in ({"top_k": 50}, {"top_p": 0.9}):
        with pytest.raises(ConfigError, match=r"ppo.top_k=\d+ / ppo.top_p=[\d.]+: PPO samples from the full"):
            PPOStageConfig(**bad)
    assert PPOStageConfig(critic_warmup_steps=99).critic_warmup_steps == 99


def test_ppo_raises_a_programmatic_reward():
    torch.manual_seed(0)
    tr = make_trainer(
        steps=6, rollout_batch_size=16, minibatch_size=8, ppo_epochs=4, lr=1e-2, max_new_tokens=6, kl_coef=0.01
    )
    prompts = [[2 + (i % 10), 3 + (i % 7)] for i in range(64)]
    history = tr.fit(prompts)
    rewards = [h["ppo/reward"] for h in history]
    # a random 16-token policy emits TARGET ~1/16 of the time: about 0.4 per 6-token response
    assert sum(rewards[-2:]) / 2 > 2 * max(sum(rewards[:2]) / 2, 0.3), rewards
    for key in (
        "ppo/kl",
        "ppo/entropy",
        "ppo/clipfrac",
        "ppo/approx_kl",
        "ppo/policy_loss",
        "ppo/value_loss",
        "ppo/explained_variance",
        "ppo/response_length",
        "ppo/ended",
        "ppo/rollout_tokens_per_s",
        "ppo/step_time_s",
        "ppo/reward_raw",
    ):
        assert key in history[-1]


def test_resume_is_bit_identical(tmp_path):
    def weights(tr):
        return {k: v.clone() for k, v in tr.unwrapped.state_dict().items()}

    torch.manual_seed(0)
    straight = make_trainer()
    straight.fit(PROMPTS * 2)
    w_straight = weights(straight)

    sd = StageDir(tmp_path / "ppo")
    torch.manual_seed(0)
    first = make_trainer(eval_interval=2, ckpt_interval=3)

    def sigterm_at_step_2(step):  # a kill arrives during step 2: the loop checkpoints and stops
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    with pytest.raises(Interrupted):
        first.fit(PROMPTS * 2, stage_dir=sd, on_eval=sigterm_at_step_2)
    assert sd.latest_checkpoint().name == "step_000002"
    torch.manual_seed(123)  # a different RNG state: the checkpoint must restore it
    second = make_trainer()
    history = second.fit(PROMPTS * 2, stage_dir=sd, resume=True)
    assert [h["step"] for h in history] == [3, 4]
    w_resumed = weights(second)
    assert w_straight.keys() == w_resumed.keys()
    for k in w_straight:
        assert torch.equal(w_straight[k], w_resumed[k]), k
    assert second.kl_ctl.value == straight.kl_ctl.value
    assert [r["step"] for r in sd.read_metrics()] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- the stage

STAGE_ARGS = [
    "ppo.steps=3",
    "ppo.rollout_batch_size=4",
    "ppo.minibatch_size=2",
    "ppo.ppo_epochs=2",
    "ppo.max_new_tokens=8",
    "ppo.max_prompt_length=48",
    "ppo.n_eval_prompts=4",
    "ppo.n_samples=2",
    "ppo.eval_interval=2",
    "ppo.ckpt_interval=1",
    "ppo.lr=1e-3",
    "data.tasks.n_ppo_train=16",
    "data.tasks.n_ppo_eval=8",
    "data.tasks.n_sft_eval=8",
]


def stage_setup(tmp_path, extra=()):
    from pipeline.config import load_config
    from tests.helpers_artifacts import make_fake_upstream, make_tokenizer

    args = [f"run.root={tmp_path}", "run.name=t", *STAGE_ARGS, *extra]
    cfg = load_config(None, args)
    tok = make_tokenizer()
    for stage in ("tokenizer", "pretrain", "sft", "reward"):
        make_fake_upstream(cfg.run_dir, cfg, stage, tokenizer=tok)
    return cfg, args


def test_stage_end_to_end_and_skip_when_done(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from stages.ppo import main

    cfg, args = stage_setup(tmp_path)
    assert main(args) == 0
    sd = StageDir.of(cfg.run_dir, "ppo")
    manifest = json.loads(sd.manifest_path.read_text())
    for key in ("reward_mean", "sft_reward_mean", "kl", "checker_accuracy"):
        assert key in manifest["metrics"], key
    assert manifest["metrics"]["n_eval"] == 4
    assert len(manifest["samples"]) == 2 and {"prompt", "sft", "policy"} <= set(manifest["samples"][0])
    lm = AutoModelForCausalLM.from_pretrained(sd.artifact)
    sft = AutoModelForCausalLM.from_pretrained(StageDir.of(cfg.run_dir, "sft").artifact)
    assert any(not torch.equal(a, b) for a, b in zip(lm.state_dict().values(), sft.state_dict().values()))
    rows = sd.read_metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 3]  # the last line is the final held-out evaluation
    assert "eval/reward_mean" in rows[1] and "eval/reward_mean" in rows[3]
    assert manifest["metrics"]["train_reward"] == rows[2]["ppo/reward"]
    assert (sd.root / "curves.png").is_file()
    assert len(sd.list_checkpoints()) == 2  # keep_checkpoints
    mtime = sd.manifest_path.stat().st_mtime
    assert main(args) == 0  # done: nothing to do
    assert sd.manifest_path.stat().st_mtime == mtime


@pytest.mark.slow
def test_stage_resumes_after_a_kill(tmp_path):
    import json
    import shutil

    from stages.ppo import main

    cfg, args = stage_setup(tmp_path)
    assert main(args) == 0
    sd = StageDir.of(cfg.run_dir, "ppo")
    full = json.loads(sd.manifest_path.read_text())
    # a kill after step 2: only checkpoints up to 2 exist, no manifest, no artifact
    sd.manifest_path.unlink()
    shutil.rmtree(sd.artifact)
    shutil.rmtree(sd.checkpoints / "step_000003")
    assert sd.state(full["fingerprint"]) == "partial"
    assert main(args) == 0
    resumed = json.loads(sd.manifest_path.read_text())
    assert [r["step"] for r in sd.read_metrics()] == [1, 2, 3, 3]
    assert resumed["metrics"]["reward_mean"] == pytest.approx(full["metrics"]["reward_mean"], abs=1e-6)
    assert resumed["metrics"]["kl"] == pytest.approx(full["metrics"]["kl"], abs=1e-6)


# ----------------------------------------------------------------------------- multi-process (slow)


def _launch(tmp_path, launch, args, name, ok=True):
    """Run the stage under ``accelerate launch`` with 2 processes and the project's config for ``launch``; with
    ``ok``, assert it succeeded. Returns the finished process."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = root / "configs" / "accelerate" / f"{launch}.yaml"
    lines = src.read_text().splitlines()
    if launch.startswith("zero"):
        # accelerate rejects a top-level mixed_precision beside a deepspeed_config_file (the JSON decides)
        lines = [ln for ln in lines if not ln.startswith("mixed_precision")]
    text = "\n".join(lines).replace("configs/accelerate/", f"{root}/configs/accelerate/")
    cfg_file = tmp_path / f"{name}.yaml"
    cfg_file.write_text(text + "\n")
    cmd = [*accelerate_launch(cfg_file), "-m", "stages.ppo", *args]
    env = child_env()  # without the launcher state earlier in-process tests leave behind
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 or not ok, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def _artifact_weights(cfg):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(StageDir.of(cfg.run_dir, "ppo").artifact).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "zero2", "zero3"])
def test_two_processes_train_agree_and_resume(tmp_path, launch):
    import json
    import shutil

    cfg, args = stage_setup(tmp_path)
    _launch(tmp_path, launch, args, "first")
    sd = StageDir.of(cfg.run_dir, "ppo")
    full = json.loads(sd.manifest_path.read_text())
    assert full["metrics"]["n_eval"] == 4
    w_full = _artifact_weights(cfg)
    # two processes: each step saw 2 x 4 prompts; all three backends give the same model
    if launch != "ddp":
        ref_cfg, ref_args = stage_setup(tmp_path / "ref")
        _launch(tmp_path, "ddp", ref_args, "ref")
        w_ref = _artifact_weights(ref_cfg)
        for k in w_ref:
            torch.testing.assert_close(w_full[k], w_ref[k], atol=1e-5, rtol=0)
    # killed after step 2: resume finishes the same run
    sd.manifest_path.unlink()
    shutil.rmtree(sd.artifact)
    shutil.rmtree(sd.checkpoints / "step_000003")
    if launch != "ddp":  # DeepSpeed's checkpoint loader unpickles: refused before any load, unless allowed
        refused = _launch(tmp_path, launch, args, "refused", ok=False)
        assert refused.returncode != 0 and not sd.manifest_path.exists(), refused.stderr[-3000:]
        assert f"stage 'ppo' would resume from {sd.checkpoints / 'step_000002'} under DeepSpeed" in refused.stderr
        assert f"{ALLOW_PICKLE_KEY}=true" in refused.stderr and sd.latest_checkpoint() == sd.checkpoints / "step_000002"
        args = [*args, f"{ALLOW_PICKLE_KEY}=true"]
    _launch(tmp_path, launch, args, "resume")
    resumed = json.loads(sd.manifest_path.read_text())
    assert [r["step"] for r in sd.read_metrics()] == [1, 2, 3, 3]
    w_res = _artifact_weights(cfg)
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], atol=1e-6, rtol=0)
    assert resumed["metrics"]["reward_mean"] == pytest.approx(full["metrics"]["reward_mean"], abs=1e-5)


@pytest.mark.slow
def test_two_processes_group_advantage_trains_and_resumes(tmp_path):
    """Group advantages under DDP (no critic at all): the policy trains, and a resumed run is the same."""
    import json
    import shutil

    cfg, args = stage_setup(tmp_path, ["ppo.advantage=group", "ppo.samples_per_prompt=2"])
    _launch(tmp_path, "ddp", args, "first")
    sd = StageDir.of(cfg.run_dir, "ppo")
    full = json.loads(sd.manifest_path.read_text())
    w_full = _artifact_weights(cfg)
    sft = StageDir.of(cfg.run_dir, "sft").artifact
    from transformers import AutoModelForCausalLM

    w_sft = AutoModelForCausalLM.from_pretrained(sft).state_dict()
    assert any(not torch.equal(w_full[k], w_sft[k]) for k in w_sft)  # the policy trained
    sd.manifest_path.unlink()
    shutil.rmtree(sd.artifact)
    shutil.rmtree(sd.checkpoints / "step_000003")
    _launch(tmp_path, "ddp", args, "resume")
    assert [r["step"] for r in sd.read_metrics()] == [1, 2, 3, 3]
    w_res = _artifact_weights(cfg)
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], atol=1e-6, rtol=0)
    resumed = json.loads(sd.manifest_path.read_text())
    assert resumed["metrics"]["reward_mean"] == pytest.approx(full["metrics"]["reward_mean"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "zero2"])
def test_two_processes_critic_warmup_keeps_the_policy(tmp_path, launch):
    """Under DDP (every parameter must get a gradient) and ZeRO-2 (flat Adam partitions) the warm-up steps leave
    the policy bit-identical to the SFT model and train the value model; the step after trains the policy, at the
    learning rate of the one-process schedule."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg, args = stage_setup(tmp_path, ["ppo.critic_warmup_steps=2"])
    _launch(tmp_path, launch, args, "warmup")
    sd = StageDir.of(cfg.run_dir, "ppo")
    ckpt = sd.checkpoints / "step_000002"
    if launch == "ddp":
        step2 = load_file(ckpt / "model.safetensors")
    else:  # DeepSpeed's own layout: the whole module's weights in the model-states file
        (states,) = ckpt.rglob("mp_rank_00_model_states.pt")
        step2 = torch.load(states, map_location="cpu", weights_only=False)["module"]
    sft = AutoModelForCausalLM.from_pretrained(StageDir.of(cfg.run_dir, "sft").artifact).state_dict()
    rm = AutoModelForSequenceClassification.from_pretrained(StageDir.of(cfg.run_dir, "reward").artifact).state_dict()
    policy = {k[len("policy.") :]: v for k, v in step2.items() if k.startswith("policy.")}
    value = {k[len("value_model.") :]: v for k, v in step2.items() if k.startswith("value_model.")}
    assert policy and all(torch.equal(v, sft[k]) for k, v in policy.items())
    assert value and any(not torch.equal(v, rm[k]) for k, v in value.items())
    w_final = _artifact_weights(cfg)
    assert any(not torch.equal(w_final[k], sft[k]) for k in sft)
    # after the warm-up the policy's Adam restarted: step 3's 4 updates against the value model's 3 x 4
    ckpt3 = sd.checkpoints / "step_000003"
    if launch == "ddp":
        opt = torch.load(ckpt3 / "optimizer.bin", map_location="cpu", weights_only=False)
        steps = [{float(opt["state"][i]["step"]) for i in g["params"]} for g in opt["param_groups"]]
    else:  # one flat partition per parameter group
        (optim_file,) = ckpt3.rglob("zero_pp_rank_0_mp_rank_00_optim_states.pt")
        opt = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        steps = [{float(st["step"])} for st in opt["base_optimizer_state"]["state"].values()]
    assert steps == [{4.0}, {12.0}]
    # the linear schedule spans the run as with one process (accelerate steps it once per process per update)
    lrs = [r["ppo/lr"] for r in sd.read_metrics() if "ppo/lr" in r]
    assert lrs == pytest.approx([1e-3 * 2 / 3, 1e-3 / 3, 0.0])


def test_bf16_reference_runs_without_gradients():
    tr = make_trainer(reference_dtype="bfloat16")
    assert next(tr.ref_model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in tr.ref_model.parameters())
    q, qm = left_pad(PROMPTS, PAD)
    ro = tr.rollout(q, qm)
    assert ro.ref_logprobs.dtype == torch.float32 and torch.isfinite(ro.ref_logprobs).all()
    # the same weights in bf16: close to the policy's fp32 log-probs, not equal
    assert (ro.ref_logprobs - ro.logprobs).abs().max() < 0.1


def test_prompt_records_normalise_and_name_bad_fields(tmp_path):
    import json

    from pipeline.config import DatasetSpec, TasksConfig
    from pipeline.data.prompts import load_prompts
    from pipeline.data.records import BadRecord

    good = [
        {"prompt": "What is 2 + 2?", "task": "add", "answer": 4},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "Spell cat."}]},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good))
    data = load_prompts(DatasetSpec(source=str(path), eval_fraction=0.0), TasksConfig(), 0)
    assert [r["prompt"] for r in data.train] == ["What is 2 + 2?", "Hi", "Spell cat."]
    assert data.train[0]["answer"] == "4" and data.train[1]["messages"] == [{"role": "user", "content": "Hi"}]
    path.write_text(json.dumps(good[0]) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(BadRecord, match=r"p\.jsonl:2: .*'prompt' or 'messages'"):
        load_prompts(DatasetSpec(source=str(path)), TasksConfig(), 0)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": 5}]}) + "\n")
    with pytest.raises(BadRecord, match=r"p\.jsonl:1: field 'messages\[0\]\.content'"):
        load_prompts(DatasetSpec(source=str(path)), TasksConfig(), 0)


def test_checker_reward_scores_each_response_against_its_prompts_record():
    from pipeline.reward import CheckerScorer

    class Chars:  # ids are character codes; 1 is the end-of-turn token
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids if i != STOP)

    records = [{"prompt": "2+2", "task": "add", "answer": "4"}, {"prompt": "5+5", "task": "add", "answer": "10"}]
    prompts = [[50, 43, 50], [53, 43, 53]]
    reward = CheckerScorer(Chars(), prompts, records)
    q, qm = left_pad([prompts[1], prompts[0], prompts[1]], PAD)
    r, rm = (
        torch.tensor([[49, 48, STOP], [52, STOP, 0], [57, STOP, 0]]),
        torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]]),
    )
    # "10" right, "4" right, "9" off by one: 0.5 + 0.4 / 2
    torch.testing.assert_close(reward.score_ids(q, qm, r, rm), torch.tensor([1.0, 1.0, 0.7]))
    with pytest.raises(Exception, match="ppo.reward=checker: prompt record 'x' has no 'task'/'answer'"):
        CheckerScorer(Chars(), [[50]], [{"prompt": "hi", "id": "x"}])


def test_old_logprobs_come_from_the_sampling_only_for_a_float32_policy_without_mixed_precision():
    """The decode loop runs the policy's modules outside the engine's autocast: under mixed precision or with bf16
    weights the rollout recomputes the old log-probs with the training forward, so the first ratio is exactly 1."""
    tr = make_trainer()
    assert tr.sampled_logprobs
    q, qm = left_pad(PROMPTS, PAD)
    torch.manual_seed(0)
    ro = tr.rollout(q, qm)
    with torch.no_grad():
        exact, _, _ = tr.model(q, qm, ro.response_ids, ro.response_mask)
    assert not torch.equal(ro.logprobs, exact * ro.response_mask)  # the sampling's, not the forward's
    torch.testing.assert_close(ro.logprobs, exact * ro.response_mask, atol=1e-5, rtol=0)
    tr.sampled_logprobs = False  # what a bf16 policy or accelerate's mixed precision sets
    torch.manual_seed(0)
    ro = tr.rollout(q, qm)
    with torch.no_grad():
        exact, _, _ = tr.model(q, qm, ro.response_ids, ro.response_mask)
    assert torch.equal(ro.logprobs, exact * ro.response_mask)
    # the flag as construction sets it: a bf16 policy, or accelerate's mixed precision, recomputes
    policy, _ = tiny_models()
    assert sampling_matches_training("no", policy)
    assert not sampling_matches_training("bf16", policy) and not sampling_matches_training("fp16", policy)
    assert not sampling_matches_training("no", policy.to(torch.bfloat16))
