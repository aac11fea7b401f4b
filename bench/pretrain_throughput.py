"""Pretraining throughput: tokens/s, ms/step, MFU (GPU) and peak memory of our loop, beside a minimal
single-file reference trainer doing the same work, appended to bench/RESULTS.md.

    python bench/pretrain_throughput.py                       # the issue's CPU setting (char, 4x4x128, T=128, B=16)
    python bench/pretrain_throughput.py --config configs/gpt2-124m.yaml --steps 30 --data <text file>   # on a GPU

Both trainers draw random windows of the same token file and run fp32 AdamW steps of the same model shape;
the first ``--warmup`` steps are not timed. Nothing here is a test: it measures and records.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import CorpusConfig, TokenizerConfig, load_config  # noqa: E402
from pipeline.data.corpus import iter_documents  # noqa: E402
from pipeline.data.shards import TokenShards, write_shards  # noqa: E402
from pipeline.model import GPT  # noqa: E402
from pipeline.pretrain import peak_flops_for, resolve_model_config, train  # noqa: E402
from pipeline.runs import StageDir  # noqa: E402
from pipeline.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def build_data(data: Path, kind: str, work: Path) -> Path:
    corpus = CorpusConfig(source="files", paths=(str(data),), txt_document_separator="\n\n")
    docs = list(iter_documents(corpus))
    tok = train_tokenizer(TokenizerConfig(kind=kind, vocab_size=2048), docs)
    save_tokenizer(tok, work / "tok")
    write_shards(docs, work / "tok", work / "tok" / "shards", seed=0, val_fraction=0.05, num_proc=1)
    return work / "tok"


def run_ours(args: argparse.Namespace, tok_dir: Path, work: Path) -> dict:
    from accelerate import Accelerator

    cfg = load_config(args.config, args.overrides)
    steps = args.warmup + args.steps
    pcfg = replace(
        cfg.pretrain,
        max_steps=steps,
        warmup_steps=1,
        eval_interval=10**9,
        ckpt_interval=10**9,
        log_interval=args.warmup,
        compile=args.compile or cfg.pretrain.compile,
    )
    seq_len = pcfg.block_size or cfg.model.block_size
    model_cfg = resolve_model_config(cfg.model, len(load_tokenizer(tok_dir)), seq_len)
    use_bf16 = torch.cuda.is_available() and cfg.pretrain.dtype != "float32"
    acc = Accelerator(gradient_accumulation_steps=pcfg.grad_accum, mixed_precision="bf16" if use_bf16 else "no")
    torch.manual_seed(0)
    model = GPT(model_cfg)
    sd = StageDir.of(work / "run", "pretrain")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(
        acc,
        model,
        TokenShards(tok_dir / "shards", "train"),
        TokenShards(tok_dir / "shards", "val"),
        pcfg,
        seq_len,
        0,
        sd,
        resume=False,
        peak_flops=peak_flops_for(acc.device, use_bf16),
        progress=False,
    )
    recs = [r for r in sd.read_metrics() if "tokens_per_s" in r][1:]  # drop the warm-up window
    out = {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs),
        "ms_per_step": statistics.median(r["ms_per_step"] for r in recs),
        "params_M": round(model.num_params() / 1e6, 3),
        "final_loss": recs[-1]["train/loss"],
    }
    if "mfu" in recs[-1]:
        out["mfu"] = statistics.median(r["mfu"] for r in recs)
    out["peak_mem_MB"] = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return out


def run_reference(args: argparse.Namespace, data: Path) -> dict | None:
    cfg = load_config(args.config, args.overrides)
    m = cfg.model
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "reference_gpt.py"),
        "--data",
        str(data),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(cfg.pretrain.batch_size),
        "--block",
        str(cfg.pretrain.block_size or m.block_size),
        "--n_layer",
        str(m.n_layer),
        "--n_head",
        str(m.n_head),
        "--n_embd",
        str(m.n_embd),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def _insert_row(path: Path, header: str, row: str) -> None:
    """Add ``row`` at the end of the table that starts with ``header`` (appended if there is none)."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    at = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    if at is None:
        lines.append(row)
    else:
        at += 1
        while at < len(lines) and lines[at].startswith("|"):
            at += 1
        lines.insert(at, row)
    path.write_text("".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="run YAML (default: the issue's CPU setting)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--tokenizer", default="char", choices=["char", "bpe"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.config is None:
        args.overrides = [
            "model.n_layer=4",
            "model.n_head=4",
            "model.n_embd=128",
            "model.block_size=128",
            "model.dropout=0",
            "pretrain.batch_size=16",
            "pretrain.dtype=float32",
            *args.overrides,
        ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok_dir = build_data(args.data, args.tokenizer, work)
        t0 = time.time()
        ours = run_ours(args, tok_dir, work)
        ref = None if args.no_reference else run_reference(args, args.data)
    ratio = ours["tokens_per_s"] / ref["tokens_per_s"] if ref else None
    print(json.dumps({"ours": ours, "reference": ref, "ratio": ratio}, indent=2))
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU x{os.cpu_count()} ({platform.processor() or platform.machine()})"
    )
    cmd = "python bench/pretrain_throughput.py " + " ".join(
        ([f"--config {args.config}"] if args.config else [])
        + ([f"--data {args.data}"] if args.data != DEFAULT_DATA else [])
        + [f"--steps {args.steps}", f"--tokenizer {args.tokenizer}"]
        + (["--compile"] if args.compile else [])
        + args.overrides
    )
    line = (
        f"| {dt.date.today()} | {device}, torch {torch.__version__}, {torch.get_num_threads()} threads | `{cmd}` | "
        f"{ours['tokens_per_s']:,.0f} tok/s, {ours['ms_per_step']:.1f} ms/step"
        + (f", MFU {ours['mfu']:.1%}" if "mfu" in ours else "")
        + f", peak {ours['peak_mem_MB']:.0f} MB | "
        + (f"reference {ref['tokens_per_s']:,.0f} tok/s (ratio {ratio:.2f}x)" if ref else "-")
        + " |\n"
    )
    _insert_row(args.results, "| date | machine | command | ours | reference |", line)
    print(f"appended to {args.results} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
