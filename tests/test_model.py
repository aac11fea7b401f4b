"""Tests of the from-scratch GPT: causality, KV cache, attention reference, overfitting, GPT-2 parity."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from pipeline.config import ModelConfig
from pipeline.gpt2_weights import from_hf, model_config_from_hf, save_hf, to_hf_config, to_hf_state_dict
from pipeline.model import GPT

V = 64


def _cfg(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=V)
    base.update(kw)
    return ModelConfig(**base)


def _perturbed(cfg: ModelConfig) -> GPT:
    """A GPT whose every parameter (biases, LayerNorm gains included) is random, so mappings are exercised."""
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# ----------------------------------------------------------------------------- basics


def test_vocab_size_must_be_resolved():
    with pytest.raises(ValueError, match="model.vocab_size"):
        GPT(_cfg(vocab_size=0))


def test_forward_shapes_loss_and_ignore_index():
    model = GPT(_cfg()).eval()
    idx = torch.randint(0, V, (2, 16))
    logits, loss = model(idx)
    assert logits.shape == (2, 16, V) and loss is None
    targets = torch.randint(0, V, (2, 16))
    _, loss = model(idx, targets)
    # near-uniform predictions at init: loss ~ ln(V) = 4.16
    assert abs(loss.item() - math.log(V)) < 0.1
    masked = targets.clone()
    masked[:, 8:] = -100
    _, loss_masked = model(idx, masked)
    _, loss_half = model(idx[:, :8], targets[:, :8])  # causal: the first 8 positions do not see the rest
    torch.testing.assert_close(loss_masked, loss_half)


def test_weights_tied_and_residual_init_scaled():
    cfg = _cfg(n_layer=4, n_embd=64)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    std_proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / math.sqrt(2 * 4)) < 0.001


def test_block_size_errors_are_clear():
    model = GPT(_cfg())
    with pytest.raises(ValueError, match="sequence length 33 exceeds model.block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"prompt length 30 \+ max_new_tokens 5 = 35 exceeds model.block_size 32"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 5)
    out = model.generate(torch.zeros(1, 30, dtype=torch.long), 2, temperature=0)  # exactly fits
    assert out.shape == (1, 32)


# ----------------------------------------------------------------------------- attention


def test_causality():
    model = _perturbed(_cfg())
    idx = torch.randint(0, V, (2, 20))
    logits, _ = model(idx)
    for t in (0, 7, 18):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % V
        logits2, _ = model(changed)
        torch.testing.assert_close(logits2[:, : t + 1], logits[:, : t + 1], atol=1e-6, rtol=0)
        assert (logits2[:, t + 1] - logits[:, t + 1]).abs().max() > 1e-4  # the changed position does change


def _naive_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Masked-softmax attention written out by hand, on ``attn``'s weights."""
    B, T, C = x.shape
    H = attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(C // H)  # (B, H, T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(B, T, C)
    return attn.c_proj(y)


@pytest.mark.parametrize("bias", [True, False])
def test_sdpa_equals_naive_attention(bias):
    model = _perturbed(_cfg(bias=bias))
    x = torch.randn(3, 17, 32)
    with torch.no_grad():
        for block in model.transformer.h:
            torch.testing.assert_close(block.attn(x), _naive_attention(block.attn, x), atol=1e-5, rtol=0)


def test_chunked_prefill_with_cache_equals_full_forward():
    model = _perturbed(_cfg())
    idx = torch.randint(0, V, (2, 20))
    full, _ = model(idx)
    cache = model.new_kv_cache()
    parts = [model(chunk, kv_cache=cache)[0] for chunk in (idx[:, :7], idx[:, 7:8], idx[:, 8:20])]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- generation


def test_kv_cache_greedy_equals_recompute():
    model = _perturbed(_cfg())
    prompt = torch.randint(0, V, (3, 5))
    cached = model.generate(prompt, 20, temperature=0.0)
    recomputed = model.generate(prompt, 20, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 25)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[:, :5], prompt)


def test_eos_stops_and_fills_finished_rows():
    model = _perturbed(_cfg())
    prompt = torch.randint(0, V, (3, 4))
    free = model.generate(prompt, 20, temperature=0.0)
    eos = int(free[0, 6])  # row 0 emits this by its 3rd new token
    unused = sorted(set(range(V)) - set(free.flatten().tolist()))[0]  # a second eos id that never fires
    first_hit = [(row[4:] == eos).nonzero() for row in free]
    cached = model.generate(prompt, 20, temperature=0.0, eos_token_id=[eos, unused])
    recomputed = model.generate(prompt, 20, temperature=0.0, eos_token_id=[eos, unused], use_cache=False)
    assert torch.equal(cached, recomputed)
    for r, hits in enumerate(first_hit):
        if len(hits):  # up to its first eos a row is the unconstrained greedy output, then eos fill
            stop = 4 + int(hits[0])
            assert torch.equal(cached[r, : stop + 1], free[r, : stop + 1])
            assert (cached[r, stop:] == eos).all()
        else:
            assert torch.equal(cached[r], free[r, : cached.shape[1]])
    if all(len(h) for h in first_hit):  # every row ended: stopped early
        assert cached.shape[1] == 4 + 1 + max(int(h[0]) for h in first_hit)
    else:
        assert cached.shape[1] == 24

    # a single sequence with an int eos stops right after its first eos
    out = model.generate(prompt[:1], 20, temperature=0.0, eos_token_id=eos)
    assert out.shape[1] == 4 + 1 + int(first_hit[0][0]) <= 7 and int(out[0, -1]) == eos


def test_topk1_and_tiny_top_p_equal_greedy():
    model = _perturbed(_cfg())
    prompt = torch.randint(0, V, (2, 4))
    greedy = model.generate(prompt, 15, temperature=0.0)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(model.generate(prompt, 15, temperature=1.3, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(prompt, 15, temperature=1.3, top_p=1e-6, generator=g), greedy)


def test_sampling_reproducible_with_generator_and_filters_apply():
    model = _perturbed(_cfg())
    prompt = torch.randint(0, V, (4, 4))

    def sample(seed: int, **kw) -> torch.Tensor:
        return model.generate(prompt, 20, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = sample(7, temperature=1.0), sample(7, temperature=1.0), sample(8, temperature=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(sample(3, top_k=5, top_p=0.9), sample(3, top_k=5, top_p=0.9))
    # cache and recompute draw the same samples from the same generator state
    assert torch.equal(sample(5, top_p=0.8), sample(5, top_p=0.8, use_cache=False))


def test_sampling_filters_restrict_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(GPT._pick(logits, 1.0, 2, 1.0, g)) for _ in range(200)}
    assert picks == {0, 1}  # top-2
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...: 0.636 < 0.8 <= 0.636 + 0.234
    assert probs[0] < 0.8 <= probs[0] + probs[1]
    picks = {int(GPT._pick(logits, 1.0, 0, 0.8, g)) for _ in range(200)}
    assert picks == {0, 1}


def test_generate_restores_training_mode():
    model = GPT(_cfg(dropout=0.2)).train()
    model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=0)
    assert model.training


# ----------------------------------------------------------------------------- training


def test_overfits_one_batch():
    model = GPT(_cfg())
    batch = torch.randint(0, V, (4, 33))
    x, y = batch[:, :-1], batch[:, 1:]
    opt = model.configure_optimizer(weight_decay=0.0, lr=1e-2, betas=(0.9, 0.95), device_type="cpu")
    losses = []
    for _ in range(100):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(V)) < 0.1
    assert losses[-1] < 0.1


def test_optimizer_groups():
    model = GPT(_cfg(bias=True))
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    d, n = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert not d & n
    assert d | n == {id(p) for p in model.parameters()}
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) == 2 + 4 * 2  # wte(=lm_head), wpe, 4 matrices per layer
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_num_params_and_flops():
    cfg = _cfg()
    model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 32 * 32  # minus wpe
    # per layer: c_attn 32*96+96, c_proj 32*32+32, c_fc 32*128+128, c_proj 128*32+32, 2 LN 2*64
    per_layer = 3168 + 1056 + 4224 + 4128 + 128
    assert total == 2 * per_layer + V * 32 + 32 * 32 + 64
    expected = 6 * model.num_params() + 12 * 2 * 2 * 16 * 32
    assert model.flops_per_token() == expected
    assert model.estimate_mfu(tokens_per_s=1000.0, peak_flops=expected * 2000.0) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- Hugging Face GPT-2 mapping


def _hf_from(model: GPT) -> GPT2LMHeadModel:
    hf = GPT2LMHeadModel(to_hf_config(model.config))
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    return hf.eval()


@pytest.mark.parametrize("bias", [True, False])
def test_hf_parity_and_round_trip(bias):
    cfg = _cfg(bias=bias, dropout=0.1)
    model = _perturbed(cfg)
    hf = _hf_from(model)
    assert hf.config.vocab_size == model.transformer.wte.weight.shape[0]
    assert hf.config.resid_pdrop == hf.config.attn_pdrop == hf.config.embd_pdrop == 0.1
    idx = torch.randint(0, V, (3, 32))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4

    back = from_hf(hf, cfg).eval()
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.lm_head.weight is back.transformer.wte.weight
    # from a bare state dict, vocab taken from the checkpoint
    back2 = from_hf(hf.state_dict(), _cfg(bias=bias, dropout=0.1, vocab_size=0))
    assert back2.config.vocab_size == V
    with torch.no_grad():
        assert torch.equal(back2.eval()(idx)[0], ours)


def test_from_hf_derives_config_and_rejects_mismatches():
    model = _perturbed(_cfg())
    hf = _hf_from(model)
    assert model_config_from_hf(hf.config) == _cfg()
    assert torch.equal(from_hf(hf).lm_head.weight, model.lm_head.weight)
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.weight: checkpoint \(32, 96\)"):
        from_hf(hf, _cfg(n_embd=64))
    with pytest.raises(ValueError, match="missing transformer.h.2"):
        from_hf(hf, _cfg(n_layer=3))
    with pytest.raises(ValueError, match="non-zero but model.bias=False"):
        from_hf(hf, _cfg(bias=False))
    bad = to_hf_config(_cfg(), bos_token_id=1)
    bad.activation_function = "relu"
    with pytest.raises(ValueError, match="activation_function='relu'"):
        model_config_from_hf(bad)
    with pytest.raises(ValueError, match="n_embd"):
        to_hf_config(_cfg(), n_embd=64)


def test_to_hf_state_dict_accepts_wrapped_state_dicts():
    model = _perturbed(_cfg(bias=False))
    wrapped = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    a, b = to_hf_state_dict(model), to_hf_state_dict(wrapped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.count_nonzero(a["transformer.h.0.attn.c_attn.bias"]) == 0
    assert a["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)  # Conv1D: (in, out)


def test_save_hf_reloads_with_auto_model(tmp_path):
    model = _perturbed(_cfg(bias=False, vocab_size=V))
    out = save_hf(
        model,
        tmp_path / "artifact",
        extra_config={"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1},
        generation_config={"eos_token_id": [5, 0], "pad_token_id": 1},
    )
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, GPT2LMHeadModel)
    assert loaded.config.pad_token_id == 1 and loaded.generation_config.eos_token_id == [5, 0]
    idx = torch.randint(0, V, (2, 32))
    with torch.no_grad():
        assert (loaded(idx).logits - model(idx)[0]).abs().max().item() <= 1e-4
    # HF greedy generation (stopping by the saved generation_config) matches ours token for token
    prompt = torch.randint(6, V, (1, 4))
    ours = model.generate(prompt, 10, temperature=0.0, eos_token_id=[5, 0])
    theirs = loaded.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, theirs)
