"""Tokenizer stage: train the tokenizer on the corpus and tokenise the corpus into memory-mapped shards.

    python -m stages.tokenizer --config configs/tiny.yaml [tokenizer.vocab_size=4096 ...]

Writes ``runs/<run>/tokenizer/artifact/``: the HF tokenizer files (``AutoTokenizer.from_pretrained``),
the tiktoken ranks and ``shards/`` (train/val token files + ``index.json``, see ``pipeline.data.shards``).
Single process; the tokenisation itself runs on ``data.corpus.num_proc`` worker processes. The artifact is
built in ``artifact.tmp`` and renamed when complete, so an interrupted run simply starts again.
"""

from __future__ import annotations

import logging
import shutil
import time

from pipeline.data.corpus import CorpusError, CorpusStats, head_bytes, iter_documents
from pipeline.data.shards import ShardError, write_shards
from pipeline.runs import StageError
from pipeline.stage import StageContext, StageResult, run_stage
from pipeline.tokenizer import TokenizerError, save_tokenizer, train_tokenizer

log = logging.getLogger("stages.tokenizer")


def _body(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    corpus = cfg.data.corpus
    final = ctx.dir.artifact
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        t0 = time.time()
        train_docs = (
            [] if cfg.tokenizer.kind == "gpt2" else head_bytes(iter_documents(corpus), cfg.tokenizer.train_bytes)
        )
        train_bytes = sum(len(d.encode("utf-8")) for d in train_docs)
        tok = train_tokenizer(cfg.tokenizer, train_docs)
        del train_docs
        train_s = time.time() - t0
        log.info(
            "tokenizer: %s, %d tokens, trained on %d bytes in %.1fs",
            tok.kind,
            tok.encoder.n_vocab,
            train_bytes,
            train_s,
        )
        save_tokenizer(tok, tmp, model_max_length=cfg.model.block_size)

        stats = CorpusStats()
        index = write_shards(
            iter_documents(corpus, stats),
            tmp,
            tmp / "shards",
            seed=cfg.run.seed,
            val_fraction=corpus.val_fraction,
            num_proc=corpus.num_proc,
            shard_tokens=corpus.shard_tokens,
            max_tokens=corpus.max_tokens,
            corpus_stats=stats,
        )
    except (CorpusError, TokenizerError, ShardError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StageError(str(e)) from None
    if final.exists():
        shutil.rmtree(final)  # left by an interrupted run: no manifest was written for it
    tmp.rename(final)

    splits = index["splits"]
    metrics = {
        "vocab_size": tok.encoder.n_vocab,
        "documents": index["documents"],
        "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "train_documents": splits["train"]["documents"],
        "val_documents": splits["val"]["documents"],
        "replaced_bytes": stats.replaced_bytes,
        "skipped_records": stats.skipped_records,
        "corpus_chars": stats.chars,
        "tokenizer_train_bytes": train_bytes,
        "tokenizer_train_s": round(train_s, 3),
        "tokenize_s": index["tokenize_seconds"],
        "tokenize_tokens_per_s": round(index["tokens"] / max(index["tokenize_seconds"], 1e-9)),
    }
    ctx.dir.append_metrics({"step": 0, **{f"tokenizer/{k}": v for k, v in metrics.items()}})
    return StageResult(metrics=metrics, extra={"corpus": stats.as_dict(), "kind": tok.kind})


def main(argv: list[str] | None = None) -> int:
    return run_stage("tokenizer", argv, _body)


if __name__ == "__main__":
    raise SystemExit(main())
