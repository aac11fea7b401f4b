"""Time to a target loss: our pretraining loop (AdamW / Muon, fp32 / bf16) against a minimal reference trainer.

    python bench/time_to_loss.py                    # char tinyshakespeare, 4 layers x 4 heads x 128, T=128, B=16
    python bench/time_to_loss.py --shape default    # configs/tiny.yaml's pretrain shape: BPE 2048, T=256
    python bench/time_to_loss.py --quick            # a smoke run of the whole procedure (seconds)

The data is ``--data`` (default ../shared/data/tinyshakespeare.txt) in every mode. ``--shape default`` tokenises it
with the default run's tokenizer (runs/tiny/tokenizer/artifact) when that exists, else with a BPE of 2048 tokens
trained on it; its model, batch, steps and warmup are configs/tiny.yaml's. Any of ``--n-layer ... --warmup``
overrides the shape.

1. Sweep: the reference (``bench/reference_gpt.py``'s model and AdamW recipe, fp32) for ``--steps`` steps at each
   of ``--lrs``; the lr with the lowest final val loss is its best, and that final val loss is the target L.
2. Repeats, alternating (reference, ours..., reference, ours...): the reference at its best lr, then our loop
   (``pipeline.pretrain.train``) as AdamW fp32, AdamW bf16, Muon fp32 and Muon bf16, each evaluated every
   ``--eval-every`` steps.
3. Per config: the median time to L over the repeats and its ratio to the reference's median; every number goes to
   ``<out>/results.json`` and the val loss against time to ``<out>/val_loss_vs_time.png``.

The same for every run: the token shards and the training windows (one sampler, seeded alike, so the same batches
in the same order), batch size, sequence length, steps, the warmup + cosine schedule (``pipeline.pretrain.lr_at``,
min lr = lr / 10), gradient clipping at 1.0, and the validation loss: the same ``--eval-iters`` batches through
one float32 function without autocast, whatever the run trains in. Our AdamW runs use the reference's best lr;
Muon runs use it for their AdamW part (embeddings, norms, biases) and ``--muon-lr`` for the block matrices.
The reference is nanoGPT's recipe: GPT-2's init (N(0, 0.02), residual projections / sqrt(2 * n_layer); ``--reference-init
torch`` gives torch's default instead, whose N(0, 1) token embedding tied to the head starts the loss far above
ln(vocab) and costs it steps) and nanoGPT's AdamW for char Shakespeare: betas (0.9, 0.99), weight decay 0.1 on
matrices and embeddings only. Ours keeps its own AdamW betas (0.9, 0.95). nanoGPT's dropout 0.2 is left out of both
(it fights overfitting over 5,000 steps; here it would only slow both to the same loss).

Time: "time to L" sums the seconds of training steps only (batch sampling, forward, backward, clipping, optimizer
step) up to the first evaluation with val loss <= L, interpolated linearly between it and the evaluation before.
Evaluation, logging, checkpoint writing and start-up are left out for both: ours is the loop's own ``train_time_s``
at each evaluation, the reference's is a clock around each of its steps. CPU only (the reference's forward builds
its positions on the CPU). Nothing here is a test: it measures and records; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from reference_gpt import TinyGPT  # noqa: E402

from pipeline.config import CorpusConfig, ModelConfig, PretrainConfig, TokenizerConfig, load_config  # noqa: E402
from pipeline.data.corpus import iter_documents  # noqa: E402
from pipeline.data.shards import TokenShards, write_shards  # noqa: E402
from pipeline.model import GPT  # noqa: E402
from pipeline.pretrain import lr_at, resolve_model_config, train  # noqa: E402
from pipeline.runs import StageDir  # noqa: E402
from pipeline.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
OURS = {
    "adamw-fp32": ("adamw", False),
    "adamw-bf16": ("adamw", True),
    "muon-fp32": ("muon", False),
    "muon-bf16": ("muon", True),
}
REFERENCE = "reference-adamw-fp32"


@dataclass(frozen=True)
class Shape:
    """What every run trains: the model, the batch and the schedule's length."""

    n_layer: int
    n_head: int
    n_embd: int
    block: int
    batch: int
    steps: int
    warmup: int
    tokenizer: str
    """``char``, ``bpe`` (trained on the data) or the path of a tokenizer folder."""


@dataclass
class Run:
    config: str
    lr: float
    repeat: int
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    """(step, training seconds so far, val loss) at each evaluation."""

    def time_to(self, target: float) -> tuple[float, float] | None:
        """(seconds, steps) at which the val loss first reaches ``target``, interpolated; None if never."""
        prev = (0, 0.0, float("inf"))
        for point in self.curve:
            if point[2] <= target:
                (s0, t0, v0), (s1, t1, v1) = prev, point
                frac = 1.0 if v0 == float("inf") else (v0 - target) / (v0 - v1)
                return t0 + frac * (t1 - t0), s0 + frac * (s1 - s0)
            prev = point
        return None


# ----------------------------------------------------------------------------- data


def shape_of(args: argparse.Namespace) -> Shape:
    """The shape of ``--shape``, with any of ``--n-layer ... --warmup`` given on the command line over it."""
    if args.shape == "default":
        cfg = load_config(ROOT / "configs" / "tiny.yaml")
        m, p = cfg.model, cfg.pretrain
        tok = ROOT / cfg.run_dir / "tokenizer" / "artifact"
        base = Shape(
            m.n_layer,
            m.n_head,
            m.n_embd,
            p.block_size or m.block_size,
            p.batch_size,
            p.max_steps,
            p.warmup_steps,
            str(tok) if (tok / "tokenizer.json").is_file() else "bpe",
        )
    else:
        base = Shape(4, 4, 128, 128, 16, 600, 50, "char")
    if args.quick:
        base = Shape(**{**asdict(base), "steps": 30, "warmup": 3})
    given = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block", "batch", "steps", "warmup")}
    return Shape(**{**asdict(base), **{k: v for k, v in given.items() if v is not None}})


def build_shards(data: Path, shape: Shape, work: Path, max_chars: int) -> tuple[TokenShards, TokenShards, str]:
    """Tokenise ``data`` (split into documents at blank lines) into train/val shards; returns them and the
    tokenizer's origin."""
    corpus = CorpusConfig(source="files", paths=(str(data),), txt_document_separator="\n\n")
    docs, n = [], 0
    for doc in iter_documents(corpus):
        docs.append(doc)
        n += len(doc)
        if max_chars and n >= max_chars:
            break
    if shape.tokenizer in ("char", "bpe"):
        tok_dir = work / "tokenizer"
        save_tokenizer(train_tokenizer(TokenizerConfig(kind=shape.tokenizer, vocab_size=2048), docs), tok_dir)
        origin = f"{shape.tokenizer}, trained on the data"
    else:
        tok_dir, origin = Path(shape.tokenizer), shape.tokenizer
    write_shards(docs, tok_dir, work / "shards", seed=0, val_fraction=0.05, num_proc=1)
    return TokenShards(work / "shards", "train"), TokenShards(work / "shards", "val"), origin


@torch.no_grad()
def val_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], val: TokenShards, shape: Shape, iters: int, seed: int
) -> float:
    """Mean float32 loss over the same ``iters`` validation batches at every call, for every trainer."""
    g = torch.Generator().manual_seed(seed + 7919)
    total = 0.0
    for _ in range(iters):
        x, y = val.sample_batch(shape.batch, shape.block, g)
        total += float(loss_fn(x, y))
    return total / iters


def _schedule(shape: Shape, lr: float, optimizer: str = "adamw", **kw: Any) -> PretrainConfig:
    return PretrainConfig(
        batch_size=shape.batch,
        max_steps=shape.steps,
        warmup_steps=shape.warmup,
        lr=lr,
        min_lr=lr / 10,
        optimizer=optimizer,
        **kw,
    )


# ----------------------------------------------------------------------------- the two trainers


def run_reference(
    lr: float, repeat: int, train_data: TokenShards, val: TokenShards, shape: Shape, args: argparse.Namespace
) -> Run:
    """``bench/reference_gpt.py``'s model and optimizer, with the shared schedule, windows and evaluation."""
    torch.manual_seed(args.seed)
    model = TinyGPT(train_data.vocab_size, shape.block, shape.n_layer, shape.n_head, shape.n_embd)
    if args.reference_init == "gpt2":  # ours: N(0, 0.02), zero biases, residual projections / sqrt(2 * n_layer)
        model.apply(GPT._init_weights)
        for block in model.blocks:
            for proj in (block.proj, block.out):
                torch.nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * shape.n_layer))
    # nanoGPT's optimizer (train.py / model.configure_optimizers, config/train_shakespeare_char.py): AdamW, betas
    # (0.9, 0.99), weight decay 0.1 on the matrices and embeddings only
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
    sched = _schedule(shape, lr)
    g = torch.Generator().manual_seed(args.seed)
    run, train_s = Run(REFERENCE, lr, repeat), 0.0
    for step in range(shape.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, sched)
        x, y = train_data.sample_batch(shape.batch, shape.block, g)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_s += time.perf_counter() - t0
        if (step + 1) % args.eval_every == 0 or step + 1 == shape.steps:
            model.eval()
            run.curve.append((step + 1, train_s, val_loss(model, val, shape, args.eval_iters, args.seed)))
            model.train()
    return run


def run_ours(
    config: str,
    lr: float,
    repeat: int,
    train_data: TokenShards,
    val: TokenShards,
    shape: Shape,
    args: argparse.Namespace,
    work: Path,
) -> Run:
    """``pipeline.pretrain.train`` as the stage runs it, evaluated by :func:`val_loss` at its evaluations."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    optimizer, bf16 = OURS[config]
    AcceleratorState._reset_state()  # accelerate keeps one precision per process; each run sets its own
    acc = Accelerator(cpu=True, mixed_precision="bf16" if bf16 else "no")
    # the loop's own evaluation (1 batch, unused) is left out of its train_time_s like ours below
    cfg = _schedule(
        shape,
        lr,
        optimizer,
        muon_lr=args.muon_lr,
        muon_momentum_warmup_steps=args.muon_momentum_warmup,
        eval_interval=args.eval_every,
        eval_iters=1,
        log_interval=args.eval_every,
        ckpt_interval=10**9,
        keep_checkpoints=1,
        dtype="bfloat16" if bf16 else "float32",
    )
    model_cfg = ModelConfig(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, block_size=shape.block)
    torch.manual_seed(args.seed)
    model = GPT(resolve_model_config(model_cfg, train_data.vocab_size, shape.block))
    losses: list[float] = []

    def evaluate(m: torch.nn.Module) -> str:  # called by the loop at each of its evaluations
        # the class's forward, not the instance's: accelerate wraps the latter in its autocast
        m.eval()
        losses.append(val_loss(lambda x, y: type(m).forward(m, x, y)[1], val, shape, args.eval_iters, args.seed))
        m.train()
        return f"float32 val loss {losses[-1]:.4f}"

    sd = StageDir.of(work / f"{config}-{repeat}", "pretrain")
    train(
        acc, model, train_data, val, cfg, shape.block, args.seed, sd, resume=False, sample_fn=evaluate, progress=False
    )
    AcceleratorState._reset_state()
    points = [(r["step"], r["train_time_s"]) for r in sd.read_metrics() if "val/loss" in r]
    return Run(config, lr, repeat, [(s, t, v) for (s, t), v in zip(points, losses, strict=True)])


# ----------------------------------------------------------------------------- report


def summarize(runs: list[Run], target: float) -> dict[str, dict[str, Any]]:
    """Per config: the times and steps to ``target`` of each repeat, their medians and the ratio to the reference."""
    out: dict[str, dict[str, Any]] = {}
    for config in dict.fromkeys(r.config for r in runs):
        hits = [r.time_to(target) for r in runs if r.config == config]
        times = [h[0] for h in hits if h is not None]
        out[config] = {
            "times_to_target_s": [h[0] if h else None for h in hits],
            "steps_to_target": [h[1] if h else None for h in hits],
            "median_time_to_target_s": statistics.median(times) if len(times) == len(hits) else None,
            "final_val_loss": [r.curve[-1][2] for r in runs if r.config == config],
        }
    ref = out[REFERENCE]["median_time_to_target_s"]
    for row in out.values():
        t = row["median_time_to_target_s"]
        row["ratio_to_reference"] = t / ref if t is not None and ref else None
    return out


def plot(runs: list[Run], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for config in dict.fromkeys(r.config for r in runs):
        for r in (r for r in runs if r.config == config):
            ax.plot(
                [p[1] for p in r.curve],
                [p[2] for p in r.curve],
                label=config if r.repeat == 0 else None,
                color=f"C{list(dict.fromkeys(x.config for x in runs)).index(config)}",
                alpha=0.8,
            )
    ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"L = {target:.4f}")
    ax.set(xlabel="training time (s, evaluation excluded)", ylabel="val loss (float32)", title="time to loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x: float | None, width: int, spec: str) -> str:
    return ("never" if x is None else format(x, spec)).rjust(width)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["char", "default"], default="char")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="text file (documents split at blank lines)")
    p.add_argument("--quick", action="store_true", help="smoke run: 30 steps, 2 lrs, 1 repeat, frequent evals")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="reference sweep (1e-3 3e-3 6e-3 1e-2)")
    p.add_argument(
        "--reference-init",
        choices=["torch", "gpt2"],
        default="gpt2",
        help="the reference's init: gpt2 (nanoGPT's, the default) or torch's default",
    )
    p.add_argument("--muon-lr", type=float, default=PretrainConfig.muon_lr)
    p.add_argument("--muon-momentum-warmup", type=int, default=0, help="pretrain.muon_momentum_warmup_steps")
    p.add_argument("--repeats", type=int, default=None, help="3 (--quick: 1)")
    p.add_argument("--configs", nargs="+", choices=list(OURS), default=list(OURS))
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (20; --quick: 5)")
    p.add_argument("--eval-iters", type=int, default=None, help="validation batches per evaluation (20; --quick: 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-chars", type=int, default=0, help="use only the first documents, this many characters")
    for name in ("n-layer", "n-head", "n-embd", "block", "batch", "steps", "warmup"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the shape's value")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "time_to_loss")
    args = p.parse_args(argv)
    args.lrs = args.lrs or ([3e-3, 1e-2] if args.quick else [1e-3, 3e-3, 6e-3, 1e-2])
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.eval_every = args.eval_every or (5 if args.quick else 20)
    args.eval_iters = args.eval_iters or (2 if args.quick else 20)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = shape_of(args)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_data, val, tok_origin = build_shards(args.data, shape, work, args.max_chars)
        print(
            f"shape {shape}; tokenizer {tok_origin}, vocab {train_data.vocab_size}; {torch.get_num_threads()} threads"
        )
        sweep = [run_reference(lr, -1, train_data, val, shape, args) for lr in args.lrs]
        for r in sweep:
            print(f"sweep: reference lr {r.lr:g}: final val loss {r.curve[-1][2]:.4f} ({r.curve[-1][1]:.1f} s)")
        best = min(sweep, key=lambda r: r.curve[-1][2])
        target = best.curve[-1][2]
        print(f"best lr {best.lr:g}; target L = {target:.4f}")
        runs: list[Run] = []
        for repeat in range(args.repeats):
            runs.append(run_reference(best.lr, repeat, train_data, val, shape, args))
            runs += [run_ours(c, best.lr, repeat, train_data, val, shape, args, work) for c in args.configs]
    summary = summarize(runs, target)
    print(f"{'config':22} {'median time to L (s)':>20} {'ratio':>6} {'steps to L':>11} {'final val':>10}")
    for config, row in summary.items():
        steps = [s for s in row["steps_to_target"] if s is not None]
        print(
            f"{config:22} {_fmt(row['median_time_to_target_s'], 20, '.2f')} {_fmt(row['ratio_to_reference'], 6, '.2f')}"
            f" {_fmt(statistics.median(steps) if steps else None, 11, '.0f')} {min(row['final_val_loss']):10.4f}"
        )
    results = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": "python bench/time_to_loss.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shape": asdict(shape),
        "tokenizer": tok_origin,
        "vocab_size": train_data.vocab_size,
        "reference_init": args.reference_init,
        "muon_lr": args.muon_lr,
        "muon_momentum_warmup_steps": args.muon_momentum_warmup,
        "eval": {"every": args.eval_every, "iters": args.eval_iters, "time": "excluded from every time"},
        "sweep": [{"lr": r.lr, "final_val_loss": r.curve[-1][2], "curve": r.curve} for r in sweep],
        "best_lr": best.lr,
        "target_loss": target,
        "summary": summary,
        "runs": [asdict(r) for r in runs],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(runs, target, args.out / "val_loss_vs_time.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'val_loss_vs_time.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
