"""The run-folder contract: states, stale protection, atomic checkpoints."""

import pytest

from pipeline.runs import StageDir, StageError, require_done


def test_states_and_stale_protection(tmp_path):
    sd = StageDir.of(tmp_path / "run", "sft")
    assert sd.state("fp1") == "missing"
    assert sd.begin("fp1", "a: 1\n") == "missing"
    assert sd.state("fp1") == "missing"  # started, but no checkpoint and no manifest: nothing to resume
    (sd.artifact).mkdir()
    (sd.artifact / "weights").write_text("w")
    sd.write_manifest("fp1", {"pretrain": "p"}, {"sft": {}}, {"train_loss": 1.0}, 2.0)
    assert sd.state("fp1") == "done"
    assert sd.state("fp2") == "stale"
    with pytest.raises(StageError, match=r"different config.*FORCE=1"):
        sd.begin("fp2", "a: 2\n")
    assert (sd.artifact / "weights").read_text() == "w"  # nothing touched
    sd.begin("fp2", "a: 2\n", force=True)
    old = [p for p in sd.root.parent.iterdir() if p.name.startswith("sft.old-")]
    assert len(old) == 1 and (old[0] / "artifact" / "weights").read_text() == "w"  # moved aside, not deleted
    assert sd.state("fp2") == "missing" and sd.started_fingerprint() == "fp2"


def test_partial_from_another_config_is_stale(tmp_path):
    sd = StageDir.of(tmp_path, "pretrain")
    sd.begin("fpA", "x")
    with sd.writing_checkpoint(10, keep=2) as d:
        (d / "w").write_text("1")
    with pytest.raises(StageError, match="different config"):
        sd.begin("fpB", "y")
    assert sd.latest_checkpoint().name == "step_000010"


def test_checkpoint_atomic_and_pruned(tmp_path):
    sd = StageDir.of(tmp_path, "pretrain")
    for step in (1, 2, 3):
        with sd.writing_checkpoint(step, keep=2) as d:
            (d / "w").write_text(str(step))
    assert [s for s, _ in sd.list_checkpoints()] == [2, 3]
    # a write cut off mid-way leaves a .tmp that is never listed or loaded
    with pytest.raises(RuntimeError):
        with sd.writing_checkpoint(4, keep=2) as d:
            (d / "w").write_text("half")
            raise RuntimeError("killed")
    assert sd.latest_checkpoint().name == "step_000003"
    # a folder renamed without its COMPLETE marker (e.g. copied by hand) is ignored too
    (sd.checkpoints / "step_000009").mkdir()
    (sd.checkpoints / "step_000008.tmp").mkdir()
    assert sd.latest_checkpoint().name == "step_000003"


def test_metrics_truncated_on_resume(tmp_path):
    sd = StageDir.of(tmp_path, "pretrain")
    for s in (10, 20, 30):
        sd.append_metrics({"step": s, "train/loss": 1.0})
    with open(sd.metrics_path, "a") as f:
        f.write('{"step": 40, "trai')  # a line cut off by SIGKILL
    sd.truncate_metrics_after(20)
    assert [r["step"] for r in sd.read_metrics()] == [10, 20]


def test_require_done_names_missing_artifact(tmp_path):
    with pytest.raises(StageError, match=r"needs the 'pretrain' stage's artifact.*make pretrain"):
        require_done(StageDir.of(tmp_path, "pretrain"), "stage 'sft'")


def test_a_failed_first_start_is_fresh_not_stale(tmp_path):
    sd = StageDir.of(tmp_path / "run", "sft")
    sd.begin("fpBad", "sft: {lr: bad}\n")  # then the stage body stopped on a config error
    sd.append_metrics({"step": 0, "note": "x"})
    sd.tb.mkdir()
    assert sd.state("fpFixed") == "missing"
    assert sd.begin("fpFixed", "sft: {lr: 0.1}\n") == "missing"  # no FORCE=1 needed
    assert sd.started_fingerprint() == "fpFixed" and (sd.root / "config.yaml").read_text() == "sft: {lr: 0.1}\n"
    assert not list((tmp_path / "run").glob("sft.old-*"))  # only bookkeeping was there: started in place


def test_a_failed_start_that_left_files_is_moved_aside_never_deleted(tmp_path):
    sd = StageDir.of(tmp_path / "run", "export")
    sd.begin("fpBad", "a\n")
    sd.artifact.mkdir()
    (sd.artifact / "half.bin").write_text("x")
    assert sd.state("fpFixed") == "missing"
    assert sd.begin("fpFixed", "b\n") == "missing"
    (old,) = (tmp_path / "run").glob("export.old-*")
    assert (old / "artifact/half.bin").read_text() == "x" and not sd.artifact.exists()
    assert sd.started_fingerprint() == "fpFixed"


def test_a_corrupt_manifest_is_its_own_state_and_force_moves_it_aside(tmp_path):
    sd = StageDir.of(tmp_path / "run", "sft")
    sd.begin("fp1", "a\n")
    sd.artifact.mkdir()
    (sd.artifact / "weights").write_text("w")
    sd.manifest_path.write_text('{"stage": "sft", "fingerp')  # cut off
    assert sd.state("fp1") == "corrupt"
    with pytest.raises(StageError, match=r"manifest.json.*FORCE=1"):
        sd.begin("fp1", "a\n")
    assert (sd.artifact / "weights").read_text() == "w"  # nothing touched
    assert sd.begin("fp1", "a\n", force=True) == "missing"
    (old,) = (tmp_path / "run").glob("sft.old-*")
    assert (old / "manifest.json").exists() and (old / "artifact/weights").read_text() == "w"
    sd.manifest_path.write_text("[1, 2]")  # JSON, but not a manifest
    assert sd.state("fp1") == "corrupt"


def test_a_restart_before_the_first_checkpoint_clears_what_the_killed_start_half_wrote(tmp_path):
    sd = StageDir.of(tmp_path / "run", "pretrain")
    sd.begin("fp1", "a\n")
    sd.append_metrics({"step": 1, "train/loss": 3.0})
    sd.checkpoint_tmp(2)  # killed while writing its first checkpoint
    assert sd.state("fp1") == "missing"
    assert sd.begin("fp1", "a\n") == "missing"
    assert sd.read_metrics() == [] and sd.find_checkpoints() == []
    assert not list((tmp_path / "run").glob("pretrain.old-*"))


def test_a_resume_starts_from_an_empty_artifact_folder(tmp_path):
    """A kill while the artifact was written (before the manifest) leaves pieces there, such as the ``.tmpXXXXXX``
    file of an interrupted tokenizer save; the resumed run writes the artifact into an empty folder."""
    sd = StageDir.of(tmp_path, "sft")
    sd.begin("fp1", "a\n")
    with sd.writing_checkpoint(4, keep=2) as d:
        (d / "w").write_text("1")
    sd.artifact.mkdir()
    (sd.artifact / ".tmpS7BRzp").write_text("half a tokenizer.json")
    sd.unlock()
    assert sd.state("fp1") == "partial"
    assert sd.begin("fp1", "a\n") == "partial"
    assert not sd.artifact.exists() and sd.latest_checkpoint().name == "step_000004"  # the checkpoint stays
    sd.artifact.mkdir()
    (sd.artifact / "weights").write_text("w")
    sd.write_manifest("fp1", {}, {"sft": {}}, {"train_loss": 1.0}, 2.0)
    sd.unlock()
    assert sd.begin("fp1", "a\n") == "done" and (sd.artifact / "weights").read_text() == "w"  # a done one is kept
