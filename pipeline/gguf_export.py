"""GGUF export for llama.cpp (and Ollama, LM Studio, llama-cpp-python): one file per output type.

``write_gguf`` turns an exported Hugging Face GPT-2 directory (``pipeline.export``) into a GGUF file with the
``gguf`` package (llama.cpp's own writer, ``gguf.GGUFWriter``), as llama.cpp's ``convert_hf_to_gguf.py`` would for
``GPT2LMHeadModel``:

- architecture ``gpt2``: context length (``n_positions``), embedding length, feed-forward length (``n_inner`` or
  4 x ``n_embd``), block count, head count, layer-norm epsilon, file type;
- tensors under llama.cpp's names (``token_embd``, ``position_embd``, ``blk.N.attn_qkv`` ...), the Conv1D weights
  transposed to (out, in); the LM head is tied to ``token_embd`` (llama.cpp reuses it when ``output`` is absent);
- output types: ``f32`` (every tensor f32), ``f16`` and ``q8_0`` (2-D weights in that type, as
  ``convert_hf_to_gguf.py`` does: norms, biases and ``position_embd`` stay f32; a weight whose rows are not a
  multiple of q8_0's 32-value block falls back to f16);
- the tokenizer: ``tokenizer.ggml.model = gpt2`` (byte-level BPE), tokens, token types (added special tokens are
  CONTROL), merges, bos/eos/pad/eot ids, ``add_bos_token = add_eos_token = False`` (our prompts never start with
  a BOS token; see ``pipeline.gguf_verify``), and the chat template;
- ``tokenizer.ggml.pre``: the llama.cpp pre-tokenizer whose splitting equals ours (:func:`match_pre_tokenizer`).

llama.cpp does not run a tokenizer's own pre-tokenizer: it picks one of its built-in implementations by the name
in ``tokenizer.ggml.pre`` (its converter identifies it by hashing the ids of a fixed text, which only works for
tokenizers it has seen before). So the name is chosen by comparing our pre-tokenizer's splitting with each
candidate's (:data:`LLAMA_CPP_PRE_TOKENIZERS`, llama.cpp's regexes, applied the way llama.cpp applies them) on a
test corpus: built-in edge cases and random Unicode (:func:`probe_corpus`), plus any text the caller adds. A
tokenizer that no candidate matches is refused with :class:`GGUFExportError`, never written with a wrong name.
The split compared here is a model of llama.cpp's; ``pipeline.gguf_verify`` checks llama.cpp itself.
"""

from __future__ import annotations

import json
import os
import random
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .publish import gguf_file_name
from .runs import StageError

__all__ = [
    "GGUF_TYPES",
    "LLAMA_CPP_PRE_TOKENIZERS",
    "GGUFExportError",
    "GGUFInfo",
    "gguf_file_name",
    "probe_corpus",
    "split_like_llama_cpp",
    "match_pre_tokenizer",
    "write_gguf",
    "write_ggufs",
]

GGUFType = Literal["f32", "f16", "q8_0"]
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "q8_0")

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA_CPP_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "gpt-2": (_GPT2_REGEX,),
    "starcoder": (r"\p{N}", _GPT2_REGEX),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_REGEX, "[0-9][0-9][0-9]"),
    "llama-bpe": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "qwen2": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
}
"""``tokenizer.ggml.pre`` name -> the regexes llama.cpp splits with, in order (``src/llama-vocab.cpp`` of
llama.cpp as vendored by llama-cpp-python 0.3.36), in the order they are tried; the first that matches is used."""

_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}
"""``general.file_type`` (gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0)."""
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
"""Activations equal to llama.cpp's GELU (the tanh approximation); others would run as a different function."""


class GGUFExportError(StageError):
    """The model or tokenizer cannot be written as a GGUF that llama.cpp runs the same; nothing was written."""


@dataclass
class GGUFInfo:
    """What ``write_gguf`` wrote."""

    path: Path
    type: str
    pre_tokenizer: str
    n_tensors: int
    size_bytes: int
    tensor_types: dict[str, str]
    """Tensor name -> GGML type name (F32, F16, Q8_0)."""


# ----------------------------------------------------------------------------- the pre-tokenizer


_PROBES = (
    "Hello world! It's 2024, naïve café: 'll 've 're 'd 'm 't 's I'VE HE'S y'all '' ''' \"quoted\" it's",
    'What is 23 + 45? 68. Say "king" in quotes. k i n g -> g n i k. 3.14159 1,000,000 12:30pm 1e-5 0x1F',
    "  two spaces   three    four\ttab\t\ttabs\n\nnewlines\r\nCRLF \n \n\n\n  \n   trailing   ",
    "\u00a0nbsp\u2009thin\u3000ideographic\u2028line\u2029para\x0bvt\x0cff\x85nel\u200bzwsp\ufeffbom",
    "Ünïcödé façade Ωμέγα Кириллица עברית العربية हिन्दी ไทย 日本語のテキスト 中文 한국어 ✅ 🦙🦙 😶\u200d🌫️",
    "digits: ٠١٢٣٤٥٦٧٨٩ ０１２３ ⅠⅡⅢ ½¾ ²³ 𝟘𝟙𝟚 — punctuation ¿¡«»„“”‘’… ------======= !!!??? ...,,,;;;",
    "e\u0301 a\u0308 n\u0303 combining: o\u0336\u0336 Z\u0351\u0352a\u0364lgo e\u20dd \u0301start",
    "code: def f(x):\n    return x**2  # comment\n\tif (a&&b||c) { y = a[i]; }\n<|notspecial|> <tag attr='v'>",
    "'s's 's 'S 'T ' s x'  ' ''s 123'456 a'b'c don't DON'T we'Ve a'lL",
)
"""Texts on which pre-tokenizers differ: contractions, digits, whitespace kinds and runs, scripts, marks, emoji."""

_CATEGORIES_SKIPPED = ("Cs", "Co", "Cn")
"""Surrogates cannot be encoded; private-use and unassigned code points have no agreed class across the
Unicode versions of Python, ``tokenizers`` (Oniguruma) and llama.cpp."""


def probe_corpus(n_random: int = 200, seed: int = 0) -> list[str]:
    """Built-in edge cases and ``n_random`` texts of random Unicode (seeded: the same list every call).

    Each random text mixes ASCII words and digits, whitespace of every kind, and code points drawn from every
    assigned category (letters, marks, numbers, punctuation, symbols, separators, controls) of the Basic and
    Supplementary planes, so that each class boundary a pre-tokenizer regex draws is crossed many times.
    """
    rng = random.Random(seed)
    pools = {
        "ascii": [chr(c) for c in range(32, 127)],
        "space": [" ", " ", " ", "  ", "\t", "\n", "\r\n", "\n\n", "\u00a0", "\u3000", "\u2003", "\x0b", "\x85"],
        "quote": ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'", "''"],
    }
    texts = list(_PROBES)
    for _ in range(n_random):
        parts = []
        for _ in range(rng.randint(5, 40)):
            kind = rng.random()
            if kind < 0.3:
                parts.append("".join(rng.choice(pools["ascii"]) for _ in range(rng.randint(1, 8))))
            elif kind < 0.5:
                parts.append(rng.choice(pools["space"]))
            elif kind < 0.6:
                parts.append(rng.choice(pools["quote"]))
            else:
                parts.append("".join(_random_char(rng) for _ in range(rng.randint(1, 4))))
        texts.append("".join(parts))
    return texts


def _random_char(rng: random.Random) -> str:
    while True:
        cp = rng.randrange(0x30000) if rng.random() < 0.2 else rng.randrange(0x3000)
        c = chr(cp)
        if unicodedata.category(c) not in _CATEGORIES_SKIPPED:
            return c


def split_like_llama_cpp(text: str, regexes: Sequence[str]) -> list[str]:
    """``text`` split as llama.cpp's ``unicode_regex_split`` does: each regex in turn splits every piece the
    previous ones made; the text between two matches is a piece of its own (nothing is dropped).

    >>> split_like_llama_cpp("It's 2024!  Ok", LLAMA_CPP_PRE_TOKENIZERS["gpt-2"])
    ['It', "'s", ' 2024', '!', ' ', ' Ok']
    """
    import regex

    pieces = [text]
    for expr in regexes:
        pattern = regex.compile(expr)
        out: list[str] = []
        for piece in pieces:
            start = 0
            for m in pattern.finditer(piece):
                if m.start() > start:
                    out.append(piece[start : m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                start = m.end()
            if start < len(piece):
                out.append(piece[start:])
        pieces = out
    return pieces


def _our_split(tokenizer: Any, text: str) -> list[str]:
    """The pieces our pre-tokenizer (a ``tokenizers.Tokenizer``'s) cuts ``text`` into, as original text."""
    return [text[a:b] for _, (a, b) in tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def match_pre_tokenizer(tokenizer_json: Path, corpus: Iterable[str]) -> str:
    """The name of the llama.cpp pre-tokenizer (``tokenizer.ggml.pre``) that splits every text of ``corpus`` as
    the tokenizer in ``tokenizer_json`` does.

    Raises:
        GGUFExportError: no candidate of :data:`LLAMA_CPP_PRE_TOKENIZERS` splits the corpus the same; the message
            shows, for the closest candidate, the first text where the splits differ.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    if tok.pre_tokenizer is None:
        raise GGUFExportError(f"gguf: {tokenizer_json} has no pre-tokenizer; llama.cpp's BPE needs one")
    texts = [t for t in corpus if t]
    ours = [_our_split(tok, t) for t in texts]
    first_diff: dict[str, tuple[int, str, list[str], list[str]]] = {}
    for name, regexes in LLAMA_CPP_PRE_TOKENIZERS.items():
        n_bad = 0
        for text, want in zip(texts, ours):
            got = split_like_llama_cpp(text, regexes)
            if got != want:
                n_bad += 1
                if name not in first_diff:
                    first_diff[name] = (0, text, want, got)
        if n_bad == 0:
            return name
        first_diff[name] = (n_bad, *first_diff[name][1:])
    closest = min(first_diff, key=lambda k: first_diff[k][0])
    n_bad, text, want, got = first_diff[closest]
    at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    raise GGUFExportError(
        f"gguf: the tokenizer's pre-tokenizer ({tokenizer_json}) splits text like none of llama.cpp's pre-tokenizers "
        f"({', '.join(LLAMA_CPP_PRE_TOKENIZERS)}), so llama.cpp would tokenise differently; no GGUF was written. "
        f"Closest: {closest!r}, which differs on {n_bad} of {len(texts)} test texts, first on {text[:80]!r}: "
        f"ours {want[max(0, at - 2) : at + 3]} vs {closest} {got[max(0, at - 2) : at + 3]}. "
        f"Use a tokenizer with GPT-2's pre-tokenisation (tokenizer.kind=bpe or gpt2) or export.formats=[hf]."
    )


# ----------------------------------------------------------------------------- the tokenizer's metadata


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int]
    """bos, eos, padding, eot -> id"""
    chat_template: str


def _read_vocab(model_dir: Path, vocab_size: int) -> _Vocab:
    import gguf

    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj.get("model", {})
    byte_level = _has_byte_level(tj.get("pre_tokenizer")) and (tj.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or not byte_level or model.get("byte_fallback") or tj.get("normalizer"):
        raise GGUFExportError(
            f"gguf: llama.cpp's 'gpt2' tokenizer is a byte-level BPE without normalizer; {model_dir}/tokenizer.json "
            f"holds a {model.get('type')} model (byte-level: {byte_level}, normalizer: "
            f"{(tj.get('normalizer') or {}).get('type')}). Export GGUF from a bpe or gpt2 tokenizer "
            f"(tokenizer.kind), or use export.formats=[hf]."
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise GGUFExportError(f"gguf: {model_dir}/tokenizer.json uses subword prefixes/suffixes, which llama.cpp lacks")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            special = added[i].get("special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    if max([*by_id, *added]) >= vocab_size:
        raise GGUFExportError(f"gguf: the tokenizer has ids >= the model's vocab_size {vocab_size}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    conf = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids = {t: i for i, t in enumerate(tokens)}

    def token_id(key: str) -> int | None:
        v = conf.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return ids.get(v) if isinstance(v, str) else None

    special = {"bos": token_id("bos_token"), "eos": token_id("eos_token"), "padding": token_id("pad_token")}
    special["eot"] = ids.get("<|end|>")
    template_file = model_dir / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else conf.get("chat_template")
    if not isinstance(template, str) or not template:
        raise GGUFExportError(f"gguf: {model_dir} has no chat template (chat_template.jinja)")
    return _Vocab(
        tokens, [int(t) for t in types], merges, {k: v for k, v in special.items() if v is not None}, template
    )


def _has_byte_level(pre: dict[str, Any] | None) -> bool:
    if not pre:
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre.get("pretokenizers", []))


# ----------------------------------------------------------------------------- weights


def _load_state(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the export's safetensors files (sharded or not), as float32 numpy arrays."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"gguf: no *.safetensors weights in {model_dir}")
    state: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            state[k.removeprefix("transformer.")] = v.float().numpy()
    return state


def _gguf_tensors(state: dict[str, np.ndarray], n_layer: int) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, array) in llama.cpp's order; Conv1D weights (in, out) transposed to (out, in)."""
    state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    out = [("token_embd.weight", state.pop("wte.weight")), ("position_embd.weight", state.pop("wpe.weight"))]
    lm_head = state.pop("lm_head.weight", None)
    for i in range(n_layer):
        p = f"h.{i}."
        for ours, theirs, transpose in (
            ("ln_1", "attn_norm", False),
            ("attn.c_attn", "attn_qkv", True),
            ("attn.c_proj", "attn_output", True),
            ("ln_2", "ffn_norm", False),
            ("mlp.c_fc", "ffn_up", True),
            ("mlp.c_proj", "ffn_down", True),
        ):
            w = state.pop(f"{p}{ours}.weight")
            out.append((f"blk.{i}.{theirs}.weight", np.ascontiguousarray(w.T) if transpose else w))
            out.append((f"blk.{i}.{theirs}.bias", state.pop(f"{p}{ours}.bias")))
    out += [("output_norm.weight", state.pop("ln_f.weight")), ("output_norm.bias", state.pop("ln_f.bias"))]
    if lm_head is not None and not np.array_equal(lm_head, out[0][1]):
        out.append(("output.weight", lm_head))  # an untied head; a tied one is token_embd (llama.cpp reuses it)
    if state:
        raise GGUFExportError(f"gguf: tensors not in GPT-2's architecture: {sorted(state)[:5]}")
    return out


def _tensor_type(name: str, arr: np.ndarray, out_type: str) -> str:
    """The GGML type ``convert_hf_to_gguf.py`` gives this tensor for ``out_type``."""
    if out_type == "f32" or arr.ndim <= 1 or not name.endswith(".weight") or name.startswith("position_embd"):
        return "F32"
    if out_type == "q8_0" and arr.shape[-1] % 32 == 0:
        return "Q8_0"
    return "F16"


# ----------------------------------------------------------------------------- writing


def _check_config(config: dict[str, Any], model_dir: Path) -> None:
    problems = []
    if config.get("model_type") != "gpt2":
        problems.append(f"model_type {config.get('model_type')!r} (not gpt2)")
    if config.get("activation_function", "gelu_new") not in _TANH_GELU:
        problems.append(f"activation_function {config.get('activation_function')!r} (llama.cpp runs tanh-GELU)")
    for key, want in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("add_cross_attention", False),
    ):
        if config.get(key, want) != want:
            problems.append(f"{key}={config.get(key)} (llama.cpp's gpt2 has {want})")
    if problems:
        raise GGUFExportError(f"gguf: {model_dir}/config.json is not a GPT-2 llama.cpp runs: " + "; ".join(problems))


def write_gguf(
    model_dir: Path,
    out_path: Path,
    out_type: str,
    corpus: Iterable[str] = (),
    name: str = "",
    license: str = "",
    pre_tokenizer: str | None = None,
) -> GGUFInfo:
    """Write the HF GPT-2 directory ``model_dir`` as the GGUF file ``out_path`` (atomically, via ``<out>.tmp``).

    Args:
        model_dir: an export (config.json, safetensors, tokenizer.json, tokenizer_config.json, chat template).
        out_path: the file to write; replaced when it exists.
        out_type: ``f32``, ``f16`` or ``q8_0``.
        corpus: texts to prove the pre-tokenizer match on, in addition to :func:`probe_corpus`.
        name: ``general.name`` (default: the folder's name).
        license: ``general.license`` (omitted when empty).
        pre_tokenizer: the name :func:`match_pre_tokenizer` gave for this tokenizer (found again when None).

    Returns:
        What was written.

    Raises:
        GGUFExportError: an unknown type, a model llama.cpp's ``gpt2`` does not compute the same (activation,
            attention scaling), a tokenizer that is not byte-level BPE or whose pre-tokenizer matches none of
            llama.cpp's; nothing is written then.
    """
    import gguf

    if out_type not in GGUF_TYPES:
        raise GGUFExportError(f"gguf: unknown output type {out_type!r}; use one of {', '.join(GGUF_TYPES)}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    _check_config(config, model_dir)
    n_layer, n_embd = int(config["n_layer"]), int(config["n_embd"])
    vocab = _read_vocab(model_dir, int(config["vocab_size"]))
    pre = pre_tokenizer or match_pre_tokenizer(model_dir / "tokenizer.json", [*probe_corpus(), *corpus])
    tensors = _gguf_tensors(_load_state(model_dir), n_layer)

    tmp = out_path.with_name(out_path.name + ".tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, arch="gpt2")
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or model_dir.name)
        if license:
            writer.add_license(license)
        writer.add_context_length(int(config.get("n_ctx") or config["n_positions"]))
        writer.add_embedding_length(n_embd)
        writer.add_feed_forward_length(int(config.get("n_inner") or 4 * n_embd))
        writer.add_block_count(n_layer)
        writer.add_head_count(int(config["n_head"]))
        writer.add_layer_norm_eps(float(config.get("layer_norm_epsilon", 1e-5)))
        writer.add_file_type(_FILE_TYPES[out_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(len(vocab.tokens))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_merges(vocab.merges)
        for key, tid in vocab.special.items():
            getattr(writer, f"add_{'pad' if key == 'padding' else key}_token_id")(tid)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_chat_template(vocab.chat_template)
        types: dict[str, str] = {}
        for tname, arr in tensors:
            ttype = types[tname] = _tensor_type(tname, arr, out_type)
            if ttype == "Q8_0":
                q = gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(tname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(tname, arr.astype(np.float16 if ttype == "F16" else np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return GGUFInfo(out_path, out_type, pre, len(tensors), out_path.stat().st_size, types)


def write_ggufs(
    model_dir: Path, out_dir: Path, name: str, types: Sequence[str], license: str = "", corpus: Iterable[str] = ()
) -> dict[str, GGUFInfo]:
    """One GGUF file per output type, ``out_dir/<name>-<type>.gguf`` (see :func:`write_gguf`), the pre-tokenizer
    matched once. On an error, the files this call wrote are removed again.

    Raises:
        GGUFExportError: see :func:`write_gguf`.
    """
    pre = match_pre_tokenizer(Path(model_dir) / "tokenizer.json", [*probe_corpus(), *corpus])
    written: dict[str, GGUFInfo] = {}
    try:
        for t in types:
            path = Path(out_dir) / gguf_file_name(name, t)
            written[t] = write_gguf(model_dir, path, t, name=name, license=license, pre_tokenizer=pre)
    except BaseException:
        for info in written.values():
            info.path.unlink(missing_ok=True)
        raise
    return written
