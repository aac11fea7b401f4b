"""The GGUF export in llama.cpp itself (llama-cpp-python in its own venv, built by ``make test-interop``):

- llama.cpp tokenises tinyshakespeare and random Unicode to our ids exactly;
- the export stage proves its GGUF files in llama.cpp: f32 greedy chat generations of held-out prompts
  (``generate_tasks`` of the config in use) token-identical to transformers', q8_0 checker accuracy within 2 points;
- llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist) converts an export made with
  ``tokenizer.kind=gpt2``, unedited.

The model is a tiny chat model trained here on the generated tasks (about a minute of CPU), or the HF folder named by
``$INTEROP_MODEL`` (e.g. ``runs/tiny/sft/artifact``). Without the venv each check is skipped and says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

from pipeline.config import TokenizerConfig, load_config
from pipeline.data.tasks import generate_tasks
from pipeline.gguf_export import probe_corpus, write_gguf
from pipeline.gguf_verify import run_llama_cpp, verify_gguf
from pipeline.runs import StageDir
from stages.export import main as export_main
from tests.fake_stages.artifacts import make_fake_run

REPO = Path(__file__).resolve().parents[1]
LLAMA_PYTHON = Path(os.environ.get("LLAMA_CPP_PYTHON", REPO / ".venv-interop" / "bin" / "python"))
"""An interpreter with llama-cpp-python: ``$LLAMA_CPP_PYTHON``, else the checkout's ``.venv-interop``."""
_SRC = sorted((REPO / ".venv-interop" / "src").glob("llama_cpp_python-*/"))
LLAMA_CPP_SRC = Path(os.environ.get("LLAMA_CPP_SRC", _SRC[-1] if _SRC else REPO / ".venv-interop" / "src"))
"""The unpacked llama-cpp-python sdist (its vendor/llama.cpp holds convert_hf_to_gguf.py)."""
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

pytestmark = pytest.mark.skipif(
    not LLAMA_PYTHON.exists(),
    reason=f"interop check skipped: llama.cpp needs llama-cpp-python in {LLAMA_PYTHON} "
    "(`make test-interop` builds .venv-interop and runs this check)",
)


def _train_chat_model(out: Path, n_steps: int = 600) -> None:
    """A 2-layer GPT-2 with a 512-token BPE, trained on the generated tasks' SFT records (default config)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    records = generate_tasks(load_config(None).data.tasks).sft_train
    docs = [m["content"] for r in records for m in r["messages"]]
    if SHAKESPEARE.is_file():
        docs += SHAKESPEARE.read_text(encoding="utf-8")[:300_000].split("\n\n")
    save_tokenizer(train_tokenizer(TokenizerConfig(vocab_size=512), docs), out, model_max_length=128)
    tok = load_tokenizer(out)
    rows = [tok.apply_chat_template(r["messages"], tokenize=False) for r in records]
    ids = [tok(t, add_special_tokens=False).input_ids[:128] for t in rows]
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=len(tok),
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(n_steps):
        batch = [ids[i] for i in torch.randint(len(ids), (32,), generator=gen).tolist()]
        width = max(map(len, batch))
        x = torch.tensor([b + [tok.pad_token_id] * (width - len(b)) for b in batch])
        labels = torch.tensor([b + [-100] * (width - len(b)) for b in batch])
        loss = model(x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(out)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A fake run whose tokenizer and ppo artifacts are a trained chat model (``$INTEROP_MODEL`` or trained here)."""
    root = tmp_path_factory.mktemp("interop")
    make_fake_run(root)
    model_dir = Path(os.environ["INTEROP_MODEL"]) if os.environ.get("INTEROP_MODEL") else root / "trained"
    if not os.environ.get("INTEROP_MODEL"):
        _train_chat_model(model_dir)
    for stage in ("tokenizer", "ppo"):
        art = StageDir.of(root / "tiny", stage).artifact
        shutil.rmtree(art)
        shutil.copytree(model_dir, art)
    return root


def test_llama_cpp_tokenises_shakespeare_and_random_unicode_to_our_ids(trained_run, tmp_path):
    from transformers import AutoTokenizer

    if not SHAKESPEARE.is_file():
        pytest.skip(f"needs {SHAKESPEARE}")
    src = StageDir.of(trained_run / "tiny", "ppo").artifact
    text = SHAKESPEARE.read_text(encoding="utf-8")
    texts = [text[i : i + 65536] for i in range(0, len(text), 65536)] + probe_corpus(n_random=500, seed=11)
    info = write_gguf(src, tmp_path / "m-f32.gguf", "f32", corpus=texts)
    res = run_llama_cpp([info.path], texts, python=str(LLAMA_PYTHON))
    got = res["files"][str(info.path.resolve())]["tokens"]
    tok = AutoTokenizer.from_pretrained(src)
    want = [tok(t, add_special_tokens=False).input_ids for t in texts]
    bad = [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
    assert not bad, f"{len(bad)} texts differ, first {texts[bad[0]][:80]!r}"
    assert sum(map(len, want)) > 300_000 and info.pre_tokenizer == "gpt-2"


def test_export_stage_proves_its_gguf_files_in_llama_cpp(trained_run):
    rc = export_main(
        [f"run.root={trained_run}", "export.formats=[hf,gguf]", f"export.gguf_verify_with={LLAMA_PYTHON}",
         "export.gguf_n_prompts=120"]
    )  # fmt: skip
    assert rc == 0
    sd = StageDir.of(trained_run / "tiny", "export")
    check = sd.manifest()["gguf"]["verification"]
    assert check["ok"], check["problems"]
    assert check["tokenisation_equal"] and check["pre_tokenizer"] == "gpt-2" and check["add_bos"] is False
    assert check["n_prompts"] == 120 and check["n_identical"] >= 50 and not check["differences"]
    assert all(t["transformers_margin"] <= 5e-3 for t in check["ties"])  # a near-tie may part, nothing else
    acc = check["accuracy"]
    assert acc["f32"] - acc["q8_0"] <= 0.02 and abs(acc["f32"] - acc["transformers"]) <= 0.02
    print(f"\nllama.cpp {check['llama_cpp']}: {check['n_identical']}/{check['n_prompts']} identical, ties "
          f"{[t['transformers_margin'] for t in check['ties']]}, accuracy {acc}")  # fmt: skip


def _tiktoken_gpt2_cache(src: Path, cache: Path) -> None:
    """tiktoken's GPT-2 files (vocab.bpe, encoder.json), rebuilt byte for byte from the GPT-2 vocabulary that
    llama.cpp ships (models/ggml-vocab-gpt-2.gguf) and stored where tiktoken caches them (it checks their hashes)."""
    r = gguf.GGUFReader(src / "vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf")
    tokens, merges = r.fields["tokenizer.ggml.tokens"].contents(), r.fields["tokenizer.ggml.merges"].contents()
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    files = {
        "vocab.bpe": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode(),
        "encoder.json": json.dumps({t: i for i, t in enumerate(tokens)}).encode(),
    }
    cache.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (cache / hashlib.sha1((base + name).encode()).hexdigest()).write_bytes(data)


def test_llama_cpp_converter_converts_a_gpt2_kind_export(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    convert = LLAMA_CPP_SRC / "vendor/llama.cpp/convert_hf_to_gguf.py"
    if not convert.is_file():
        pytest.skip(
            f"interop check skipped: no llama.cpp sources at {LLAMA_CPP_SRC} (`make test-interop` unpacks them)"
        )
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    _tiktoken_gpt2_cache(LLAMA_CPP_SRC, tmp_path / "tiktoken")
    make_fake_run(tmp_path, "tokenizer.kind=gpt2")
    tok_dir = StageDir.of(tmp_path / "tiny", "tokenizer").artifact
    shutil.rmtree(tok_dir)
    save_tokenizer(train_tokenizer(TokenizerConfig(kind="gpt2"), []), tok_dir, model_max_length=64)
    tok = load_tokenizer(tok_dir)
    ppo = StageDir.of(tmp_path / "tiny", "ppo").artifact
    shutil.rmtree(ppo)
    shutil.copytree(tok_dir, ppo)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok),
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(ppo)  # fmt: skip
    assert export_main([f"run.root={tmp_path}", "tokenizer.kind=gpt2"]) == 0
    export = StageDir.of(tmp_path / "tiny", "export").artifact
    out = tmp_path / "converted.gguf"
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP_SRC / "vendor/llama.cpp/gguf-py")}
    proc = subprocess.run(
        [sys.executable, str(convert), str(export), "--outfile", str(out), "--outtype", "f32"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = gguf.GGUFReader(out)
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2" and r.fields["gpt2.context_length"].contents() == 64
    texts = ["Hello world! It's 2024, naïve café.", *probe_corpus(n_random=20)]
    got = run_llama_cpp([out], texts, python=str(LLAMA_PYTHON))["files"][str(out.resolve())]["tokens"]
    assert got == [tok(t, add_special_tokens=False).input_ids for t in texts]


def test_the_runs_own_gguf_export_in_llama_cpp():
    """The GGUF files of a real run (``make all`` then ``make export FORMAT=gguf``): ``make test-interop`` names the
    run with ``$INTEROP_CONFIG`` / ``$INTEROP_ARGS`` and proves its files as the export stage would, had llama.cpp
    been importable then (the tokenisation corpus, f32 greedy tokens on the held-out prompts, q8_0 accuracy)."""
    import shlex

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.environ.get("INTEROP_CONFIG"):
        pytest.skip("interop check skipped: no run named ($INTEROP_CONFIG; `make test-interop` sets it to $(CONFIG))")
    cfg = load_config(os.environ["INTEROP_CONFIG"], shlex.split(os.environ.get("INTEROP_ARGS", "")))
    sd = StageDir.of(cfg.run_dir, "export")
    manifest = sd.manifest() if sd.manifest_path.is_file() else None
    if not manifest or "gguf" not in manifest:
        pytest.skip(f"interop check skipped: no GGUF export in {sd.root} (`make export FORMAT=gguf` writes one)")
    files = {name[len(cfg.run.name) + 1 : -len(".gguf")]: sd.root / name for name in manifest["gguf"]["files"]}
    assert files and all(p.is_file() for p in files.values()), files
    model = AutoModelForCausalLM.from_pretrained(sd.artifact, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(sd.artifact)
    records = generate_tasks(cfg.data.tasks).ppo_eval[: cfg.export.gguf_n_prompts]
    check = verify_gguf(files, model, tok, probe_corpus(), records, str(LLAMA_PYTHON))
    print(f"\n{sd.root}: llama.cpp {check['llama_cpp']}, {check['n_texts']} texts / {check['n_tokens']} tokens "
          f"equal: {check['tokenisation_equal']}, {check.get('n_identical')}/{check['n_prompts']} identical, ties "
          f"{[t['transformers_margin'] for t in check.get('ties', [])]}, accuracy {check.get('accuracy')}")  # fmt: skip
    assert check["ok"], check["problems"]
    assert check["tokenisation_equal"] and check["n_identical"] >= 50 and not check["differences"]
    assert set(files) >= {"f32", "q8_0"} and check["accuracy"]["f32"] - check["accuracy"]["q8_0"] <= 0.02
