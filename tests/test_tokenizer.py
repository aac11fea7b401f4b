"""Tokenizer: tiktoken == HF ids, round trips, special tokens, chat template and assistant masks, kinds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import tiktoken
from transformers import AutoTokenizer

from pipeline import tokenizer as T
from pipeline.config import TokenizerConfig
from pipeline.tokenizer.encoder import read_ranks
from pipeline.tokenizer.train import tokenizer_from_ranks

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
"""The shared reference text beside the checkout (``../shared/data``), when there is one."""


def _reference_text() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")
    # without the shared folder: a deterministic stand-in with the same flavour and enough distinct words for a
    # 1,024-token BPE (3,000 pseudo-words of syllables, plus Shakespeare's punctuation and contractions)
    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvw" for b in "aeiou"] + ["th", "st", "ng", "er", "ou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    words += "thou art the king of Denmark ROMEO: JULIET: what's 'tis o'er we'll I've don't 1599 -- ; ! ?".split()
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(4000))


@pytest.fixture(scope="module")
def text() -> str:
    return _reference_text()


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory, text: str) -> Path:
    docs = text[:400_000].split("\n\n")
    tok = T.train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=1024), docs)
    return T.save_tokenizer(tok, tmp_path_factory.mktemp("bpe"), model_max_length=128)


@pytest.fixture(scope="module")
def hf(bpe_dir: Path):
    return T.load_tokenizer(bpe_dir)


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [
        (0x20, 0x7E),
        (0x09, 0x0D),
        (0xA0, 0x24F),
        (0x370, 0x3FF),
        (0x400, 0x4FF),
        (0x300, 0x36F),
        (0x4E00, 0x9FFF),
        (0x3040, 0x30FF),
        (0x1F300, 0x1FAFF),
        (0x10000, 0x10FFFF),
        (0xE000, 0xFFFD),
    ]
    out = []
    for _ in range(n):
        if rng.random() < 0.3:
            out.append(rng.choice([" ", "  ", "\n", "\n\n", "'s", "'ll", " the", "123", "\t"]))
            continue
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        out.append(chr(c) if not 0xD800 <= c <= 0xDFFF else "x")
    return "".join(out)


def test_tiktoken_equals_hf_on_reference_text(bpe_dir: Path, hf, text: str) -> None:
    enc = T.load_encoder(bpe_dir)
    fast = enc.encode_ordinary(text)
    ref = hf(text, add_special_tokens=False)["input_ids"]
    assert len(fast) == len(ref) > 100_000
    assert fast == ref
    assert enc.n_vocab == len(hf) == 1024
    assert enc.decode(fast) == text


def test_random_unicode_round_trip_and_same_ids(bpe_dir: Path, hf) -> None:
    enc = T.load_encoder(bpe_dir)
    rng = random.Random(1234)
    for _ in range(300):
        s = _random_unicode(rng, rng.randint(0, 60))
        ids = enc.encode_ordinary(s)
        assert enc.decode(ids) == s
        assert hf(s, add_special_tokens=False)["input_ids"] == ids, repr(s)
        assert hf.decode(ids) == s
    assert enc.encode_ordinary("") == []


def test_special_tokens_are_single_ids(bpe_dir: Path, hf) -> None:
    enc = T.load_encoder(bpe_dir)
    for i, s in enumerate(T.SPECIAL_TOKENS):
        assert hf(s, add_special_tokens=False)["input_ids"] == [i]
        assert enc.encode(s, allowed_special="all") == [i]
    assert enc.eot_token == hf.convert_tokens_to_ids("<|endoftext|>") == 0
    assert (hf.pad_token, hf.eos_token) == ("<|pad|>", "<|endoftext|>")
    assert hf.model_max_length == 128
    auto = AutoTokenizer.from_pretrained(str(bpe_dir))
    assert auto("x<|end|>y")["input_ids"] == hf("x<|end|>y")["input_ids"]
    assert auto.chat_template == T.CHAT_TEMPLATE
    assert "\n" not in T.CHAT_TEMPLATE
    # special-token text in a corpus is plain text for the corpus encoder (no injection of control tokens)
    assert len(enc.encode_ordinary("<|end|>")) > 1


def test_chat_template_renders_exactly(hf) -> None:
    conv = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    assert hf.apply_chat_template(conv, tokenize=False) == "<|user|>What is 2+3?<|end|><|assistant|>5<|end|>"
    assert (
        hf.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, conv[0]], tokenize=False, add_generation_prompt=True
        )
        == "<|system|>Be brief.<|end|><|user|>What is 2+3?<|end|><|assistant|>"
    )
    with pytest.raises(Exception, match="chat role must be"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_assistant_mask_covers_exactly_answers_and_end(hf) -> None:
    conv = [
        {"role": "system", "content": "You add."},
        {"role": "user", "content": "1 + 2 = ?"},
        {"role": "assistant", "content": " three, i.e. 3"},
        {"role": "user", "content": "and 2+2"},
        {"role": "assistant", "content": "4!"},
    ]
    out = hf.apply_chat_template(conv, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    end, asst = hf.convert_tokens_to_ids("<|end|>"), hf.convert_tokens_to_ids("<|assistant|>")
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [hf.decode(s) for s in spans] == [" three, i.e. 3<|end|>", "4!<|end|>"]
    assert all(s[-1] == end for s in spans)
    # each span starts right after <|assistant|>, and nothing else is masked
    starts = [k for k in range(1, len(ids)) if mask[k] and not mask[k - 1]]
    assert [ids[k - 1] for k in starts] == [asst, asst]
    assert sum(mask) == sum(len(s) for s in spans)


def test_char_kind_round_trip_and_unknown(tmp_path: Path, text: str) -> None:
    sample = text[:20_000]
    tok = T.train_tokenizer(TokenizerConfig(kind="char"), [sample])
    T.save_tokenizer(tok, tmp_path, model_max_length=64)
    hf, enc = T.load_tokenizer(tmp_path), T.load_encoder(tmp_path)
    assert enc.encode_ordinary(sample) == hf(sample, add_special_tokens=False)["input_ids"]
    assert len(enc.encode_ordinary(sample)) == len(sample)  # one token per character
    assert enc.decode(enc.encode_ordinary(sample)) == sample == hf.decode(hf(sample)["input_ids"])
    assert enc.encode_ordinary("12+3") == hf("12+3")["input_ids"] and T.UNK_TOKEN not in hf.decode(
        hf("12+3")["input_ids"]
    )
    unk = hf.convert_tokens_to_ids(T.UNK_TOKEN)
    assert (
        enc.encode_ordinary("a\u4e2db")
        == hf("a\u4e2db")["input_ids"]
        == [enc.encode_ordinary("a")[0], unk, enc.encode_ordinary("b")[0]]
    )
    for i, s in enumerate(T.SPECIAL_TOKENS):
        assert hf(s)["input_ids"] == [i]
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    out = hf.apply_chat_template(conv, return_assistant_tokens_mask=True, return_dict=True)
    assert hf.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]) == "yo<|end|>"
    assert enc.eot_token == 0 and enc.n_vocab == len(hf)


def test_gpt2_kind_offline_raises_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str):
        raise ConnectionError(f"Failed to resolve 'openaipublic.blob.core.windows.net' for {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(T.TokenizerError, match="TIKTOKEN_CACHE_DIR"):
        T.train_tokenizer(TokenizerConfig(kind="gpt2"), [])


def test_gpt2_kind_builds_hf_files_from_ranks(
    monkeypatch: pytest.MonkeyPatch, bpe_dir: Path, tmp_path: Path, text: str
) -> None:
    """The gpt2 path on a stand-in encoding shaped like GPT-2's (ranks first, <|endoftext|> last)."""
    ranks = read_ranks(bpe_dir / "tokenizer.tiktoken")
    dense = {t: r for r, t in enumerate(sorted(ranks, key=ranks.__getitem__))}
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pattern as tiktoken writes it

    fake = tiktoken.Encoding(
        "gpt2", pat_str=r50k_pat_str, mergeable_ranks=dense, special_tokens={"<|endoftext|>": len(dense)}
    )
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    tok = T.train_tokenizer(TokenizerConfig(kind="gpt2"), [])
    T.save_tokenizer(tok, tmp_path)
    hf, enc = T.load_tokenizer(tmp_path), T.load_encoder(tmp_path)
    sample = text[:100_000] + _random_unicode(random.Random(5), 3000)
    assert enc.encode_ordinary(sample) == fake.encode_ordinary(sample) == hf(sample)["input_ids"]
    assert hf.decode(hf(sample)["input_ids"]) == sample
    base = len(dense)
    assert [hf.convert_tokens_to_ids(s) for s in T.SPECIAL_TOKENS] == list(range(base, base + 6))
    assert enc.eot_token == base and enc.n_vocab == len(hf) == base + 6


def test_ensure_chat_tokens_on_foreign_tokenizer(bpe_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    vocab = raw.get_vocab()
    # a "foreign" tokenizer: same byte-level model, only <|endoftext|> special, no pad, no template
    foreign = Tokenizer(raw.model)
    foreign.pre_tokenizer, foreign.decoder = raw.pre_tokenizer, raw.decoder
    foreign.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=foreign, eos_token="<|endoftext|>")
    n0 = len(tok)
    assert n0 == len(vocab)  # the model still holds the 6 reserved strings at ids 0..5
    added = T.ensure_chat_tokens(tok)
    assert added == len(tok) - n0 == 0  # reused as special tokens, no new ids
    assert tok.pad_token == "<|pad|>" and tok.chat_template == T.CHAT_TEMPLATE
    for s in T.SPECIAL_TOKENS:
        assert len(tok(s, add_special_tokens=False)["input_ids"]) == 1, s
    assert T.ensure_chat_tokens(tok) == 0

    # a tokenizer that lacks them entirely gets 6 new ids
    small = tokenizer_from_ranks({bytes([b]): b for b in range(256)}, {"<|endoftext|>": 256})
    tok2 = PreTrainedTokenizerFast(tokenizer_object=small)
    assert T.ensure_chat_tokens(tok2) == 5
    assert len(tok2) == 262 and tok2.pad_token == "<|pad|>" and tok2.eos_token == "<|endoftext|>"
    assert tok2.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == "<|user|>a<|end|>"


def test_vocab_size_too_small_is_a_clear_error() -> None:
    from types import SimpleNamespace

    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        TokenizerConfig(vocab_size=100)
    with pytest.raises(T.TokenizerError, match="tokenizer.vocab_size=100"):
        T.train_tokenizer(SimpleNamespace(kind="bpe", vocab_size=100, min_frequency=2), ["abc"])  # type: ignore[arg-type]
    with pytest.raises(T.TokenizerError, match="no training text"):
        T.train_tokenizer(TokenizerConfig(), ["", ""])


def test_tokenizer_stage_end_to_end(tmp_path: Path, text: str) -> None:
    """The stage on a local corpus: artifact loadable, shards written, manifest metrics, then 'done'."""
    import json

    from pipeline.data.shards import TokenShards
    from stages.tokenizer import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text[:150_000], encoding="utf-8")
    argv = [
        f"run.root={tmp_path / 'runs'}",
        "data.corpus.source=files",
        f"data.corpus.paths=[{corpus}]",
        'data.corpus.txt_document_separator="\\n\\n"',  # YAML double quotes: two newlines
        "data.corpus.num_proc=1",
        "tokenizer.vocab_size=400",
        "model.block_size=64",
        "ppo.max_prompt_length=32",  # with the default 32 new tokens, within the context
    ]
    assert main(argv) == 0
    stage = tmp_path / "runs" / "tiny" / "tokenizer"
    manifest = json.loads((stage / "manifest.json").read_text())
    m = manifest["metrics"]
    assert m["vocab_size"] == 400 and m["documents"] == m["train_documents"] + m["val_documents"] > 100
    assert m["train_tokens"] > m["val_tokens"] > 0 and m["replaced_bytes"] == m["skipped_records"] == 0
    art = stage / "artifact"
    hf = AutoTokenizer.from_pretrained(str(art))
    assert hf.model_max_length == 64 and len(hf) == 400
    train = TokenShards(art / "shards", "train")
    assert train.tokens == m["train_tokens"] and train.vocab_size == 400
    enc = T.load_encoder(art)
    docs = [d for d in text[:150_000].split("\n\n") if d.strip()]
    assert m["documents"] == len(docs)
    assert m["train_tokens"] + m["val_tokens"] == sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    assert not (stage / "artifact.tmp").exists()
    mtime = (stage / "manifest.json").stat().st_mtime
    assert main(argv) == 0 and (stage / "manifest.json").stat().st_mtime == mtime  # done: nothing redone
    assert main([*argv, "data.corpus.paths=[/nonexistent.txt]"]) == 2  # another config: stale, refused


@pytest.mark.slow
def test_trl_accepts_the_chat_template(hf) -> None:
    """TRL's SFTTrainer keeps our template for assistant_only_loss (markers present, <|end|> trained)."""
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(hf.chat_template)
    assert is_chat_template_stop_token_trained(hf)
