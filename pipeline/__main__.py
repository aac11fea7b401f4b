"""Command line of the whole pipeline (the Makefile targets call this).

    python -m pipeline run <stage|all> --config configs/tiny.yaml [--launch cpu|ddp|zero2|zero3] [--nproc N]
                                       [--force] [section.key=value ...]
    python -m pipeline status  --config C [overrides]
    python -m pipeline export  --config C [--launch ...] [--force] [overrides]     # = run export
    python -m pipeline report  --config C [--no-samples] [overrides]
    python -m pipeline chat    --config C [--stage ppo | --model DIR] [--temperature T] [--top-k K] [--top-p P]
                                          [--max-new-tokens N] [--system TEXT] [overrides]

Exit codes: 0 ok; 2 config/usage error, stale stage, corrupt checkpoint or bad input; otherwise the failing
stage's own exit code (128+N when it was killed by signal N).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config
from .orchestrate import LAUNCHES, RunOptions, run_pipeline
from .runs import STAGES, StageError
from .status import run_status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description="Run, inspect and export the RLHF pipeline.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", default=None, help="run YAML (default: dataclass defaults)")
        sp.add_argument("overrides", nargs="*", help="section.key=value overrides")

    def launch(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--launch", default="cpu", choices=LAUNCHES, help="accelerate config to launch training stages with"
        )
        sp.add_argument("--nproc", type=int, default=0, help="processes per launch (0: the accelerate config's)")
        sp.add_argument("--force", action="store_true", help="move stale stage folders aside and make them again")

    run = sub.add_parser("run", help="bring a stage (and everything it needs) up to date")
    run.add_argument("target", choices=("all", *STAGES))
    common(run)
    launch(run)
    common(sub.add_parser("status", help="state, key metrics and paths of every stage"))
    exp = sub.add_parser("export", help="export the aligned model as a Hugging Face model directory (= run export)")
    common(exp)
    launch(exp)
    rep = sub.add_parser("report", help="write runs/<run>/report.md with plots")
    rep.add_argument("--no-samples", action="store_true", help="do not generate sample answers (faster)")
    common(rep)
    chat = sub.add_parser("chat", help="chat with a stage's model in the terminal")
    chat.add_argument("--stage", default=None, help="pretrain|sft|ppo|export (default: the newest done one)")
    chat.add_argument("--model", default=None, help="any Hugging Face causal LM directory (instead of --stage)")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-k", type=int, default=0, help="0: off")
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--system", default="", help="system message for the conversation")
    chat.add_argument("--seed", type=int, default=None)
    common(chat)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # overrides may come after options (`run sft --config c.yaml sft.lr=1e-4`), which argparse leaves over
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-") or "=" not in r]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*getattr(args, "overrides", []), *rest]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command in ("run", "export"):
            opts = RunOptions(args.config, tuple(args.overrides), args.launch, args.nproc, args.force)
            return run_pipeline("export" if args.command == "export" else args.target, opts)
        cfg = load_config(args.config, args.overrides)
        if args.command == "status":
            print(f"run {cfg.run_dir}  (config {args.config or 'defaults'})")
            for st in run_status(cfg):
                print(st.line())
            return 0
        if args.command == "report":
            from .report import write_report  # torch and transformers: only for the commands that need them

            print(write_report(cfg, samples=not args.no_samples))
            return 0
        from .chat import ChatSettings, chat_loop, resolve_model_dir  # likewise

        settings = ChatSettings(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.system, args.seed)
        return chat_loop(resolve_model_dir(cfg, args.stage, args.model), settings)
    except (ConfigError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "returncode", 2)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
