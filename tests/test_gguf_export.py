"""GGUF export without llama.cpp: files read back with gguf.GGUFReader, the pre-tokenizer match and its refusal.
(The export stage with ``export.formats=[hf,gguf]`` is tested in tests/test_export.py.)

The llama.cpp side (tokenisation, greedy identity, q8_0 accuracy, llama.cpp's own converter) is in
tests/test_gguf_interop.py, which ``make test-interop`` runs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM

from pipeline.gguf_export import (
    GGUFExportError,
    match_pre_tokenizer,
    probe_corpus,
    split_like_llama_cpp,
    write_gguf,
)
from tests.fake_stages.artifacts import make_model, make_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def _corpus() -> list[str]:
    """tinyshakespeare (in 64 kB pieces) plus random Unicode of another seed than the built-in one."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"needs {SHAKESPEARE} (shared/data beside the checkout)")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    return [text[i : i + 65536] for i in range(0, len(text), 65536)] + probe_corpus(n_random=300, seed=7)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny exported model directory: the fake BPE tokenizer (GPT-2 pre-tokenisation), a 2-layer GPT-2."""
    d = tmp_path_factory.mktemp("hf")
    tok = make_tokenizer()
    tok.save_pretrained(d)
    (d / "chat_template.jinja").write_text(tok.chat_template)
    make_model(tok).save_pretrained(d)
    return d


def _field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
def test_gguf_holds_every_tensor_and_the_tokenizer(hf_dir, tmp_path, out_type):
    info = write_gguf(hf_dir, tmp_path / f"m-{out_type}.gguf", out_type, name="tiny", license="mit")
    r = gguf.GGUFReader(info.path)
    config = json.loads((hf_dir / "config.json").read_text())
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    # architecture and hyperparameters
    assert _field(r, "general.architecture") == "gpt2" and _field(r, "general.name") == "tiny"
    assert _field(r, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[out_type]
    assert _field(r, "gpt2.context_length") == config["n_positions"] == 64
    assert _field(r, "gpt2.embedding_length") == 32 and _field(r, "gpt2.feed_forward_length") == 128
    assert _field(r, "gpt2.block_count") == 2 and _field(r, "gpt2.attention.head_count") == 2
    assert _field(r, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    # the tokenizer: every token and merge, types, special ids, no BOS added, the chat template
    vocab = {**tj["model"]["vocab"], **{a["content"]: a["id"] for a in tj["added_tokens"]}}
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(r, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    types = _field(r, "tokenizer.ggml.token_type")
    assert types == [3 if i < 6 else 1 for i in range(len(vocab))]  # added special tokens are CONTROL
    assert _field(r, "tokenizer.ggml.merges") == [
        " ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]
    ]
    assert (_field(r, "tokenizer.ggml.bos_token_id"), _field(r, "tokenizer.ggml.eos_token_id")) == (0, 0)
    assert (_field(r, "tokenizer.ggml.padding_token_id"), _field(r, "tokenizer.ggml.eot_token_id")) == (1, 5)
    assert _field(r, "tokenizer.ggml.add_bos_token") is False and _field(r, "tokenizer.ggml.add_eos_token") is False
    assert _field(r, "tokenizer.chat_template") == (hf_dir / "chat_template.jinja").read_text()
    # every tensor, under llama.cpp's name, with the HF weights' values (Conv1D weights transposed)
    sd = {
        k.removeprefix("transformer."): v.numpy()
        for k, v in AutoModelForCausalLM.from_pretrained(hf_dir).state_dict().items()
    }
    want = {"token_embd.weight": sd["wte.weight"], "position_embd.weight": sd["wpe.weight"],
            "output_norm.weight": sd["ln_f.weight"], "output_norm.bias": sd["ln_f.bias"]}  # fmt: skip
    for i in range(2):
        for ours, theirs, t in (("ln_1", "attn_norm", False), ("attn.c_attn", "attn_qkv", True),
                                ("attn.c_proj", "attn_output", True), ("ln_2", "ffn_norm", False),
                                ("mlp.c_fc", "ffn_up", True), ("mlp.c_proj", "ffn_down", True)):  # fmt: skip
            w = sd[f"h.{i}.{ours}.weight"]
            want[f"blk.{i}.{theirs}.weight"] = w.T if t else w
            want[f"blk.{i}.{theirs}.bias"] = sd[f"h.{i}.{ours}.bias"]
    assert sorted(t.name for t in r.tensors) == sorted(want) and len(r.tensors) == info.n_tensors == 28
    for t in r.tensors:
        expected = want[t.name]
        matrix = expected.ndim == 2 and t.name != "position_embd.weight"
        kind = {"f32": "F32", "f16": "F16" if matrix else "F32", "q8_0": "Q8_0" if matrix else "F32"}[out_type]
        assert t.tensor_type.name == kind == info.tensor_types[t.name], t.name
        assert tuple(int(x) for x in t.shape) == tuple(reversed(expected.shape)), t.name  # GGML lists ne0 first
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        if kind == "F32":
            assert np.array_equal(got, expected), t.name
        else:  # f16: rounding; q8_0: 8-bit blocks of 32 with an f16 scale
            tol = 1e-3 if kind == "F16" else np.abs(expected).max() / 127 * 0.51 + 1e-6
            assert np.abs(got - expected).max() <= tol, t.name


def test_gpt2_pre_tokenizer_matches_llama_cpp_on_shakespeare_and_random_unicode(hf_dir):
    corpus = _corpus()
    assert match_pre_tokenizer(hf_dir / "tokenizer.json", corpus) == "gpt-2"
    # the project's own tokenizers write GPT-2's regex as a Split before ByteLevel(use_regex=False)
    from pipeline.tokenizer import GPT2_PATTERN
    from pipeline.tokenizer.train import _byte_level_pre_tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(GPT2_PATTERN)
    tok.save(str(hf_dir.parent / "split.json"))
    assert match_pre_tokenizer(hf_dir.parent / "split.json", corpus) == "gpt-2"


def test_another_llama_cpp_pre_tokenizer_is_found(hf_dir, tmp_path):
    """Digits one by one, then GPT-2's regex: llama.cpp's 'starcoder' splitting, not 'gpt-2'."""
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    assert match_pre_tokenizer(tmp_path / "tokenizer.json", probe_corpus()) == "starcoder"


def test_a_pre_tokenizer_llama_cpp_lacks_is_refused_and_nothing_is_written(hf_dir, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    for f in hf_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.save(str(d / "tokenizer.json"))
    out = tmp_path / "m.gguf"
    with pytest.raises(GGUFExportError, match=r"splits text like none of llama.cpp's pre-tokenizers") as e:
        write_gguf(d, out, "f32")
    assert "no GGUF was written" in str(e.value) and "first on" in str(e.value)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_a_char_tokenizer_is_refused(hf_dir, tmp_path):
    from pipeline.config import TokenizerConfig
    from pipeline.tokenizer import save_tokenizer, train_tokenizer

    d = tmp_path / "char"
    save_tokenizer(train_tokenizer(TokenizerConfig(kind="char"), ["hello world"]), d)
    for f in ("config.json", "model.safetensors"):
        (d / f).write_bytes((hf_dir / f).read_bytes())
    with pytest.raises(GGUFExportError, match="byte-level BPE"):
        write_gguf(d, tmp_path / "c.gguf", "f32")
    assert not (tmp_path / "c.gguf").exists()


def test_split_like_llama_cpp_keeps_unmatched_text():
    """llama.cpp keeps the text between matches as pieces: GPT-2's regex without its last ``|\\s+``."""
    gpt2 = ("'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",)
    assert split_like_llama_cpp("a\tb  c\n", gpt2) == ["a", "\t", "b", " ", " c", "\n"]
    text = "".join(chr(random.Random(0).randrange(0x3000)) for _ in range(200))
    assert "".join(split_like_llama_cpp(text, gpt2)) == text
