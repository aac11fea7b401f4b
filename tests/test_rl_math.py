"""PPO arithmetic against hand-computed values (the arithmetic is in the comments)."""

import math

import pytest
import torch

from pipeline.lm import entropy_from_logits, logprobs_from_logits
from pipeline.rl.gae import compute_gae, group_advantages, masked_mean, masked_var, masked_whiten
from pipeline.rl.kl import (
    AdaptiveKLController,
    FixedKLController,
    compute_rewards,
    kl_per_token,
    last_token_index,
    sequence_returns,
)
from pipeline.rl.losses import explained_variance, policy_loss, value_loss
from pipeline.rl.scores import final_scores, reward_normalisation

NAN = float("nan")


def close(a, b, tol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), atol=tol, rtol=0
    )


def test_gae_and_returns_hand_computed():
    # gamma = 0.5, lam = 0.5 -> gamma * lam = 0.25; V after the last response token is 0.
    # row 0 (3 tokens): r = [0, 0, 1], V = [0.5, 0.25, 0.5]
    #   t=2: delta = 1 + 0.5*0    - 0.5  =  0.5    A2 = 0.5
    #   t=1: delta = 0 + 0.5*0.5  - 0.25 =  0.0    A1 = 0.0    + 0.25*0.5   =  0.125
    #   t=0: delta = 0 + 0.5*0.25 - 0.5  = -0.375  A0 = -0.375 + 0.25*0.125 = -0.34375
    #   R = A + V = [0.15625, 0.375, 1.0]
    # row 1 (2 tokens + 1 pad whose reward 9 and value 7 must be ignored): r = [0, 2], V = [1, 0.5]
    #   t=1: delta = 2 + 0 - 0.5 = 1.5                      A1 = 1.5
    #   t=0: delta = 0 + 0.5*0.5 - 1 = -0.75                A0 = -0.75 + 0.25*1.5 = -0.375
    #   R = [0.625, 2.0, 0]
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.25, 0.5], [1.0, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.5, lam=0.5)
    close(adv, [[-0.34375, 0.125, 0.5], [-0.375, 1.5, 0.0]])
    close(ret, [[0.15625, 0.375, 1.0], [0.625, 2.0, 0.0]])


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    # gamma = lam = 1: A_t = sum_{k>=t} r_k - V_t (Monte-Carlo advantage); R_t = reward to go.
    rewards = torch.tensor([[1.0, -2.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, -1.0]])
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(ret, [[2.0, 1.0, 3.0]])  # 1-2+3, -2+3, 3
    close(adv, [[1.5, 0.0, 4.0]])


def test_masked_statistics_and_whitening():
    # unmasked values 1, 2, 3, 4: mean 2.5; unbiased var = (1.5^2+0.5^2+0.5^2+1.5^2)/3 = 5/3, std = 1.2909944
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(masked_mean(x, mask), 2.5)
    close(masked_var(x, mask), 5 / 3)
    w = masked_whiten(x, mask)
    s = math.sqrt(5 / 3)
    close(w, [[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]], tol=1e-5)
    # shift_mean=False keeps the mean: (x - 2.5)/s + 2.5
    close(masked_whiten(x, mask, shift_mean=False)[0, 0], -1.5 / s + 2.5, tol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_clipped_policy_loss_hand_computed():
    # eps = 0.2; ratios exp(logp - old) = 1.5, 0.5, 1.0, 1.5; the 5th token is padding (huge values)
    # t0: A= 1, r=1.5: max(-1.5, -1.2) = -1.2  (clipped term wins -> counts in clipfrac)
    # t1: A=-1, r=0.5: max( 0.5,  0.8) =  0.8  (clipped)
    # t2: A= 2, r=1.0: max(-2.0, -2.0) = -2.0  (not clipped)
    # t3: A=-1, r=1.5: max( 1.5,  1.2) =  1.5  (unclipped term wins: a bad move is never clipped away)
    # loss = (-1.2 + 0.8 - 2.0 + 1.5) / 4 = -0.225; clipfrac = 2/4
    # approx_kl = 0.5 * (ln1.5^2 + ln0.5^2 + 0 + ln1.5^2) / 4 = 0.5 * (0.164402 + 0.480453 + 0.164402) / 4 = 0.101157
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    new = old + torch.log(torch.tensor([[1.5, 0.5, 1.0, 1.5, 1000.0]]))
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0, 1e6]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(new, old, adv, mask, cliprange=0.2)
    close(loss, -0.225)
    close(stats["clipfrac"], 0.5)
    close(stats["approx_kl"], 0.101157, tol=1e-6)
    close(stats["ratio"], (1.5 + 0.5 + 1.0 + 1.5) / 4)


def test_policy_loss_gradient_is_zero_where_clipped():
    # d/dlogp of -A*ratio is -A*ratio; the clipped branch is constant in logp.
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    loss, _ = policy_loss(new, old, torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), cliprange=0.2)
    loss.backward()
    close(new.grad, [[0.0, -1.1 / 2]])


def test_clipped_value_loss_hand_computed():
    # eps_v = 0.2
    # t0: v=1, old=0.5 -> v_clip = 0.5 + 0.2 = 0.7; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 1.69 (clipped)
    # t1: v=0, old=0.5 -> v_clip = 0.5 - 0.2 = 0.3; (0-0)^2 = 0, (0.3-0)^2 = 0.09 -> 0.09 (clipped)
    # t2: v=2, old=2   -> v_clip = 2;             (2-1)^2 = 1, 1                -> 1    (not clipped)
    # loss = 0.5 * (1.69 + 0.09 + 1) / 3 = 0.4633333; vf_clipfrac = 2/3
    values = torch.tensor([[1.0, 0.0, 2.0, 50.0]])
    old = torch.tensor([[0.5, 0.5, 2.0, -50.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    close(loss, 0.5 * 2.78 / 3)
    close(stats["vf_clipfrac"], 2 / 3)


def test_kl_penalty_rewards_hand_computed():
    # kl_t = logp - ref: row0 = [-1+1.5, -2+2, -3+2] = [0.5, 0, -1]; row1 = [0.5, -0.5, pad]
    # beta = 0.1: r = -0.1*kl, and the score goes on the last response token
    # row0 = [-0.05, 0, 0.1 + 1.0] ; row1 = [-0.05, 0.05 + (-2.0), 0]
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = compute_rewards(torch.tensor([1.0, -2.0]), logprobs, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, 0.0, -1.0], [0.5, -0.5, 0.0]])
    close(rewards, [[-0.05, 0.0, 1.1], [-0.05, -1.95, 0.0]])
    close(last_token_index(mask), [2, 1])


def test_group_advantages_hand_computed():
    # two prompts x 3 samples; beta = 0.5; returns R = score - 0.5 * summed KL (padding's KL 9 ignored)
    # prompt 0: scores [1, 0, 2], KL sums [0.2, 0, 0.4] -> R = [0.9, 0, 1.8]
    #   leave-one-out baselines: (0 + 1.8)/2 = 0.9, (0.9 + 1.8)/2 = 1.35, (0.9 + 0)/2 = 0.45
    #   A = [0, -1.35, 1.35]
    # prompt 1: all scores 3, no KL -> R = 3 each, A = 0 (no signal when every sample is as good)
    scores = torch.tensor([1.0, 0.0, 2.0, 3.0, 3.0, 3.0])
    kl = torch.tensor([[0.1, 0.1, 9.0], [0.0, 0.0, 0.0], [0.4, 0.0, 0.0], [0.0] * 3, [0.0] * 3, [0.0] * 3])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    adv, ret = group_advantages(sequence_returns(scores, kl, mask, kl_coef=0.5), mask, group_size=3)
    close(adv, [[0.0, 0.0, 0.0], [-1.35, 0.0, 0.0], [1.35, 1.35, 1.35], [0.0] * 3, [0.0] * 3, [0.0] * 3])
    close(ret, [[0.9, 0.9, 0.0], [0.0, 0.0, 0.0], [1.8, 1.8, 1.8], [3.0, 3.0, 0.0], [3.0, 0.0, 0.0], [3.0] * 3])
    # a group's advantages sum to zero
    close(adv[:, 0].view(2, 3).sum(1), [0.0, 0.0])
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(sequence_returns(scores, kl, mask, 0.5), mask, group_size=4)


def test_kl_is_zero_when_policy_equals_reference():
    lp = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    assert kl_per_token(lp, lp.clone(), mask).abs().max() == 0
    rewards, _ = compute_rewards(torch.zeros(3), lp, lp.clone(), mask, kl_coef=0.3)
    assert rewards.abs().max() == 0


def test_kl_controllers():
    # Ziegler et al.: e = clip(KL/target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, n_steps=64)  # e = clip(0.5) = 0.2   -> 0.1 * (1 + 0.2*64/10000) = 0.100128
    close(c.value, 0.100128)
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(6.6, n_steps=64)  # e = 0.1               -> 0.1 * 1.00064
    close(c.value, 0.100064)
    c.update(0.0, n_steps=64)  # e = clip(-1) = -0.2   -> 0.100064 * (1 - 0.00128)
    close(c.value, 0.100064 * 0.99872)
    d = AdaptiveKLController(1.0, 6.0, 10000)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value
    f = FixedKLController(0.05)
    f.update(100.0, 64)
    assert f.value == 0.05


def test_entropy_logprobs_and_explained_variance():
    # uniform over 4: H = ln 4; p = [0.25, 0.75]: H = 0.25 ln4 + 0.75 ln(4/3) = 0.346574 + 0.215762
    close(entropy_from_logits(torch.zeros(1, 1, 4)), [[math.log(4)]])
    close(entropy_from_logits(torch.tensor([[[0.0, math.log(3)]]])), [[0.562335]])
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    ref = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, tokens), ref.tolist(), tol=1e-5)
    # returns [1,2,3,4] (pop. var 1.25), errors [0,0,0,1] (pop. var 0.1875): 1 - 0.1875/1.25 = 0.85
    ev = explained_variance(
        torch.tensor([[1.0, 2.0, 3.0, 3.0, 9.0]]),
        torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0]]),
        torch.tensor([[1, 1, 1, 1, 0]]),
    )
    close(ev, 0.85)


def test_reward_normalisation_and_final_scores_hand_computed():
    # standardize with mean 1, std 2: raw 1 -> 0, raw 3 -> 1, raw 11 -> 5, raw -4 -> -2.5
    shift, scale = reward_normalisation("standardize", {"mean": 1.0, "std": 2.0})
    normalised = (torch.tensor([1.0, 3.0, 11.0, -4.0]) - shift) / scale
    close(normalised, [0.0, 1.0, 5.0, -2.5])
    assert reward_normalisation("center", {"mean": 1.0, "std": 2.0}) == (1.0, 1.0)
    assert reward_normalisation("none", {"mean": 1.0, "std": 2.0}) == (0.0, 1.0)
    assert reward_normalisation("standardize", {"mean": 1.0, "std": 0.0}) == (1.0, 1e-8)  # no division by 0
    ended = torch.tensor([True, False, True, False])
    # reward_clip 2: [0, 1, 2, -2]; penalty 0.5 where not ended: [0, 0.5, 2, -2.5]
    close(final_scores(normalised, ended, reward_clip=2.0, missing_eos_penalty=0.5), [0.0, 0.5, 2.0, -2.5])
    # reward_clip 0 is off: [0, 1, 5, -2.5] minus the penalty [0, 0.5, 0, 0.5]
    close(final_scores(normalised, ended, reward_clip=0.0, missing_eos_penalty=0.5), [0.0, 0.5, 5.0, -3.0])
    with pytest.raises(ValueError, match="reward_clip must be >= 0"):
        final_scores(normalised, ended, reward_clip=-1.0)
