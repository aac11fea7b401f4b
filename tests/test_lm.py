"""pipeline.lm: chat generation (left padding, stop at <|end|>); pipeline.analysis.checker: checker accuracy."""

from __future__ import annotations

import pytest
import torch

from pipeline.analysis.checker import checker_accuracy
from pipeline.lm import decode_answer, ensure_end_token, generate_responses, stop_token_ids, truncate_after_stop
from tests.helpers_artifacts import make_tiny_lm, make_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and kind to a shared machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return make_tiny_lm(tok, n_positions=64)


def test_stop_ids_put_end_of_turn_first(tok, lm):
    stops = stop_token_ids(tok, lm)
    assert stops[0] == tok.convert_tokens_to_ids("<|end|>")
    assert tok.eos_token_id in stops and len(stops) == len(set(stops))


def test_batched_left_padded_generation_equals_one_by_one(tok, lm):
    prompts = ["What is 12 plus 30?", "Hi", "Reverse the word apple please, then count the letters"]
    batched = generate_responses(lm, tok, prompts, max_new_tokens=8, batch_size=3)
    single = [generate_responses(lm, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(r, str) for r in batched)
    lm.train()
    generate_responses(lm, tok, prompts[:1], max_new_tokens=2)
    assert lm.training  # the caller's mode is restored
    lm.eval()


def test_greedy_matches_manual_argmax_and_stops_at_end(tok, lm):
    """Greedy answer = argmax decoding of the rendered chat prompt, cut at the first stop token."""
    prompt = "What is 2 plus 2?"
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stops = set(stop_token_ids(tok, lm))
    out: list[int] = []
    lm.eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        for _ in range(10):
            nxt = int(lm(x).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    expected = tok.decode(out, skip_special_tokens=True)
    assert generate_responses(lm, tok, [prompt], max_new_tokens=10) == [expected]


def test_only_the_end_of_turn_token_ends_a_response():
    END, EOT, PAD = 9, 8, 0  # <|end|> (stop_ids[0]), <|endoftext|>, padding
    ids = torch.tensor([[4, END, 5, 5], [4, EOT, 5, 5], [4, 4, 4, 4], [EOT, END, 5, 5], [END, EOT, 5, 5]])
    out, mask, ended = truncate_after_stop(ids, [END, EOT], PAD)
    # cut after the first stop of either kind, but ended only where that first stop is <|end|>
    assert out.tolist() == [[4, END, 0, 0], [4, EOT, 0, 0], [4, 4, 4, 4], [EOT, 0, 0, 0], [END, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, False, False, True]
    # what a reward model scores: every response closed by <|end|>, a <|endoftext|> kept before it
    closed, closed_mask = ensure_end_token(out, mask, [END, EOT], PAD)
    assert closed.tolist() == [
        [4, END, 0, 0, 0],
        [4, EOT, END, 0, 0],
        [4, 4, 4, 4, END],
        [EOT, END, 0, 0, 0],
        [END, 0, 0, 0, 0],
    ]
    assert closed_mask.sum(1).tolist() == [2, 3, 5, 2, 1]


def test_decode_cuts_at_first_stop_and_drops_special_tokens(tok):
    end = tok.convert_tokens_to_ids("<|end|>")
    hi = tok("hi", add_special_tokens=False)["input_ids"]
    user = tok.convert_tokens_to_ids("<|user|>")
    assert decode_answer(tok, hi + [user] + hi + [end] + hi, {end}) == "hihi"


def test_sampling_is_reproducible_with_seed_and_restores_rng(tok, lm):
    prompts = ["a", "b c"]
    state = torch.random.get_rng_state()
    a = generate_responses(lm, tok, prompts, max_new_tokens=6, do_sample=True, top_k=20, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    b = generate_responses(lm, tok, prompts, max_new_tokens=6, do_sample=True, top_k=20, seed=7)
    assert a == b


def test_long_prompt_is_cut_to_fit_context(tok, lm):
    long = "word " * 200  # far more than the 64-token context
    (resp,) = generate_responses(lm, tok, [long], max_new_tokens=8)
    assert isinstance(resp, str)
    with pytest.raises(ValueError, match="no room"):
        generate_responses(lm, tok, ["x"], max_new_tokens=64)


def test_checker_accuracy():
    pytest.importorskip("pipeline.data.tasks")
    from pipeline.data.tasks import check_answer

    recs = [
        {"task": "add", "answer": "5", "id": "1"},
        {"task": "add", "answer": "7", "id": "2"},
        {"prompt": "no checker"},
    ]
    responses = ["5", "8", "anything"]
    expected = [check_answer(recs[0], "5"), check_answer(recs[1], "8")]
    assert expected == [True, False]
    assert checker_accuracy(recs, responses) == pytest.approx(0.5)


def test_checker_accuracy_none_without_checker_and_length_mismatch():
    assert checker_accuracy([{"prompt": "q"}], ["a"]) is None
    assert checker_accuracy([], []) is None
    with pytest.raises(ValueError, match="2 records but 1 responses"):
        checker_accuracy([{}, {}], ["a"])


@pytest.mark.parametrize(
    "settings", [{"do_sample": True, "temperature": 1.0}, {"do_sample": True, "temperature": 0.7}, {"do_sample": False}]
)
def test_lean_decode_gives_generates_tokens(settings):
    """The lean GPT-2 decode loop against Hugging Face's generate: the same tokens, masks and endings from the same
    RNG state, on left-padded prompts of different lengths, with stop tokens met at different steps (a bias on the
    stop tokens' logits makes them frequent) and rows that never stop."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.lm import generate, lean_decode_applies, left_pad

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=24, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    with torch.no_grad():
        model.lm_head.weight[3] += 0.3  # shared with the embedding: stop token 3 comes up often
    model.eval()
    assert lean_decode_applies(model, settings["do_sample"], 0, 1.0)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14], [4, 4], [15, 16, 17, 18], [20]]
    q, qm = left_pad(prompts, 0, "cpu")
    ended = []
    for seed in range(8):
        torch.manual_seed(seed)
        lean = generate(model, q, qm, 10, [3, 2], 0, **settings)
        after_lean = torch.get_rng_state()
        torch.manual_seed(seed)
        hf = generate(model, q, qm, 10, [3, 2], 0, lean=False, **settings)
        for a, b in zip(lean, hf):
            assert torch.equal(a, b), (seed, a, b)
        assert torch.equal(after_lean, torch.get_rng_state())  # the same draws from the RNG
        ended += lean[2].tolist()
    if settings["do_sample"]:
        assert any(ended) and not all(ended)  # rows that stopped at <|end|> and rows that did not


def test_lean_decode_is_used_only_where_it_matches_generate():
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.lm import lean_decode_applies

    model = GPT2LMHeadModel(GPT2Config(vocab_size=24, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    assert lean_decode_applies(model, True, 0, 1.0) and lean_decode_applies(model, False, 50, 0.9)
    assert not lean_decode_applies(model, True, 50, 1.0) and not lean_decode_applies(model, True, 0, 0.9)
    model.config._attn_implementation = "eager"
    assert not lean_decode_applies(model, True, 0, 1.0)


def test_lean_decode_is_taken_without_generate_kwargs_or_with_synced_gpus_false(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    import pipeline.lm as lm

    calls = []
    real = lm._lean_decode
    monkeypatch.setattr(lm, "_lean_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=24, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    q, qm = lm.left_pad([[5, 6], [7]], 0, "cpu")
    for kwargs, taken in (({}, 1), ({"synced_gpus": False}, 1), ({"lean": False}, 0), ({"top_k": 5}, 0)):
        calls.clear()
        lm.generate(model, q, qm, 4, [3], 0, **kwargs)
        assert len(calls) == taken, kwargs


def test_inverse_cdf_draw_samples_the_distribution_and_never_a_zero_probability_token():
    """One uniform number per row, the first index whose cumulative probability exceeds it: frequencies within 5
    standard errors of the probabilities over 200k draws; entries of probability 0 (first, middle, last) never."""
    from pipeline.lm import _inverse_cdf_draw

    torch.manual_seed(0)
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    draws = torch.cat([_inverse_cdf_draw(p.expand(20_000, -1)) for _ in range(10)])
    freq = torch.bincount(draws, minlength=len(p)).double() / len(draws)
    assert freq[p == 0].sum() == 0
    se = (p.double() * (1 - p.double()) / len(draws)).sqrt()
    assert ((freq - p.double()).abs() <= 5 * se + 1e-12).all(), (freq, p)
    # an unnormalised row (it sums to 8) and a one-hot row
    q = torch.tensor([[2.0, 0.0, 6.0], [0.0, 0.0, 1.0]])
    draws = torch.stack([_inverse_cdf_draw(q) for _ in range(4000)])
    assert (draws[:, 1] == 2).all() and (draws[:, 0] != 1).all()
    assert abs((draws[:, 0] == 2).double().mean().item() - 0.75) < 0.03


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_responses_returns_the_sampling_log_probs_and_entropies(temperature):
    """PPO's sampler: the lean loop's log-probs and entropies equal those of a forward pass over prompt+response
    (up to float rounding), are 0 after each response's end, and the tokens' frequencies follow the model's
    distribution; where the lean loop does not apply, generate samples and no log-probs come back."""
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.lm import left_pad, response_logits, response_logprobs, sample_responses

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=24, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    with torch.no_grad():
        model.lm_head.weight[3] += 0.3  # stop token 3 comes up often
    model.eval()
    q, qm = left_pad([[5, 6, 7], [8], [9, 10, 11, 12, 13, 14], [4, 4], [15, 16, 17, 18], [20]], 0, "cpu")
    ended = []
    for seed in range(4):
        torch.manual_seed(seed)
        s = sample_responses(model, q, qm, 10, [3, 2], 0, temperature=temperature)
        ended += s.ended.tolist()
        with torch.no_grad():
            lp = response_logprobs(model, q, qm, s.ids, s.mask, temperature)
            logits = response_logits(model, q, qm, s.ids, s.mask, temperature)
            ent = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1) * s.mask
        torch.testing.assert_close(s.logprobs, lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.entropy, ent, atol=1e-5, rtol=0)
        assert (s.logprobs[s.mask == 0] == 0).all() and (s.entropy[s.mask == 0] == 0).all()
    assert any(ended) and not all(ended)
    torch.manual_seed(0)
    assert sample_responses(model, q, qm, 40, [3, 2], 0, temperature=temperature).ids.shape[1] < 40  # stopped early
    torch.manual_seed(3)
    bare = sample_responses(model, q, qm, 10, [3, 2], 0, temperature=temperature, with_logprobs=False)
    assert torch.equal(bare.ids, s.ids) and bare.logprobs is None and bare.entropy is None  # the same tokens, no stats
    # the first token of one prompt, drawn 6000 times: its frequencies against the model's probabilities
    torch.manual_seed(1)
    one, one_mask = q[:1].expand(6000, -1), qm[:1].expand(6000, -1)
    first = sample_responses(model, one, one_mask, 1, [3, 2], 0, temperature=temperature).ids[:, 0]
    with torch.no_grad():
        probs = F.softmax(model(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1] / temperature, -1).double()
    freq = torch.bincount(first, minlength=24).double() / len(first)
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / len(first)).sqrt() + 1e-3).all()
    assert sample_responses(model, q, qm, 4, [3], 0, temperature=temperature, top_k=5).logprobs is None


def test_tanh_gelu_is_gpt2s_gelu_in_value_and_gradient():
    from pipeline.lm import TanhGELU

    torch.manual_seed(0)
    x = (torch.randn(64, 96) * 3).requires_grad_()
    g = torch.randn(64, 96)
    TanhGELU()(x).backward(g)
    x64 = x.detach().double().requires_grad_()
    y64 = torch.nn.functional.gelu(x64, approximate="tanh")
    y64.backward(g.double())
    torch.testing.assert_close(TanhGELU()(x.detach()).double(), y64.detach(), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-5, rtol=1e-5)
    # a second derivative is refused rather than wrong (the backward is not itself differentiable)
    z = torch.tensor([0.3], requires_grad=True)
    (dz,) = torch.autograd.grad(TanhGELU()(z).sum(), z, create_graph=True)
    with pytest.raises(RuntimeError):
        dz.sum().backward()
    # the same function as transformers' gelu_new formula
    from transformers.activations import NewGELUActivation

    torch.testing.assert_close(TanhGELU()(x.detach()), NewGELUActivation()(x.detach()), atol=2e-6, rtol=1e-6)


def test_tanh_gelu_has_finite_gradients_at_extreme_inputs_and_falls_back_below_float32():
    from pipeline.lm import TanhGELU

    x = torch.tensor([-1e20, -1e6, -30.0, -1e-30, 0.0, 1e-30, 30.0, 1e6, 1e20], requires_grad=True)
    y = TanhGELU()(x)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.tolist() == pytest.approx([0, 0, 0, 0.5, 0.5, 0.5, 1, 1, 1], abs=1e-6)
    assert y[6].item() == 30.0 and y[2].item() == pytest.approx(0.0, abs=1e-30)
    xb = torch.randn(8, 16).bfloat16()
    # bfloat16 takes torch's fused kernel (float32 internals), bit for bit
    assert torch.equal(TanhGELU()(xb), torch.nn.functional.gelu(xb, approximate="tanh"))


def test_logprobs_from_logits_is_the_log_softmax_at_the_token():
    from pipeline.lm import logprobs_from_logits

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    tokens = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(logprobs_from_logits(logits, tokens).double(), expected, atol=1e-6, rtol=0)
