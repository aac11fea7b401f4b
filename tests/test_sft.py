"""SFT stage: exact assistant-only labels, truncate/drop counts, trainer options, resume, and that
fine-tuning makes the model answer held-out questions (checker accuracy) better than before."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.checkpoint import ALLOW_PICKLE_KEY
from pipeline.config import ConfigError, SFTStageConfig, load_config
from pipeline.data.tasks import generate_tasks
from pipeline.runs import CHECKPOINT_MARKER, StageDir
from pipeline.sft import build_sft_config, build_trainer
from pipeline.sft_data import IGNORE_INDEX, tokenize_chat, tokenize_examples
from tests.helpers_artifacts import make_fake_upstream, make_tiny_lm, make_tokenizer
from tests.helpers_launch import accelerate_launch, child_env

ROOT = Path(__file__).resolve().parents[1]
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Spell the word king."},
    {"role": "assistant", "content": "k i n g"},
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread and do not oversubscribe a shared machine (measured: the
    accuracy test takes 27 s with 1 thread vs 97-143 s with 2 on a loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    sets = generate_tasks(load_config(None, ["data.tasks.n_sft_train=200", "data.tasks.n_sft_eval=20"]).data.tasks)
    text = " ".join(m["content"] for r in sets.sft_train for m in r["messages"])
    return make_tokenizer([text], vocab_size=512)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _expected(tok, messages):
    """ids/labels built piece by piece: special tokens split the text, so each piece tokenises alone."""
    sid = tok.convert_tokens_to_ids
    ids, labels = [], []
    for m in messages:
        content = _ids(tok, m["content"])
        turn = [sid(f"<|{m['role']}|>")] + content + [sid("<|end|>")]
        ids += turn
        if m["role"] == "assistant":  # the role token is context; the answer and its <|end|> are targets
            labels += [IGNORE_INDEX] + content + [sid("<|end|>")]
        else:
            labels += [IGNORE_INDEX] * len(turn)
    return ids, labels


# ----------------------------------------------------------------------------- labels


def test_labels_mask_is_exact(tok):
    ids, labels = tokenize_chat(tok, CONVERSATION)
    exp_ids, exp_labels = _expected(tok, CONVERSATION)
    assert ids == exp_ids
    assert labels == exp_labels
    end = tok.convert_tokens_to_ids("<|end|>")
    # both assistant turns end on a counted <|end|>; the other three <|end|> tokens are ignored
    assert sum(1 for t, lab in zip(ids, labels) if t == end and lab == end) == 2
    assert sum(1 for t, lab in zip(ids, labels) if t == end and lab == IGNORE_INDEX) == 3


def test_full_sequence_loss_when_assistant_only_is_off(tok):
    ids, labels = tokenize_chat(tok, CONVERSATION, assistant_only=False)
    assert labels == ids


def test_template_without_generation_markers_is_an_error(tok):
    plain = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    other = make_tokenizer()
    other.chat_template = plain
    with pytest.raises(ValueError, match="generation"):
        tokenize_chat(other, CONVERSATION)


def test_trainer_trains_on_exactly_those_labels(tok, tmp_path):
    """The SFTTrainer's dataset, collated batch and loss see the same mask: the loss equals a cross
    entropy over the assistant tokens only."""
    records = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    examples, _ = tokenize_examples(tok, records, max_length=64)
    model = make_tiny_lm(tok, n_positions=64)
    cfg = SFTStageConfig(batch_size=2, max_steps=1, n_samples=0)
    trainer = build_trainer(model, tok, examples, [], cfg, StageDir(tmp_path / "sft"), 0, [], 64)
    assert trainer.train_dataset["labels"] == [e["labels"] for e in examples]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["labels"][1, len(examples[1]["labels"]) :].eq(IGNORE_INDEX).all()  # padding ignored too
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
        logits, target = out.logits[:, :-1], batch["labels"][:, 1:]
        keep = target != IGNORE_INDEX
        manual = F.cross_entropy(logits[keep], target[keep])
    n_assistant = sum(t != IGNORE_INDEX for e in examples for t in e["labels"])
    assert keep.sum() == n_assistant
    assert torch.allclose(out.loss, manual, atol=1e-6)


def test_packing_keeps_examples_apart(tok, tmp_path):
    """With packing, several examples share one row; the loss over the packed row (position ids restart
    per example, so attention stays within each) equals the loss over the examples one by one."""
    records = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": str(2 * i) * (1 + i % 3)},
            ]
        }
        for i in range(8)
    ]
    examples, _ = tokenize_examples(tok, records, max_length=64)
    model = make_tiny_lm(tok, n_positions=64)
    cfg = SFTStageConfig(batch_size=8, max_steps=1, packing=True)
    trainer = build_trainer(model, tok, examples, [], cfg, StageDir(tmp_path / "sft"), 0, [], 64)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert len(rows) < len(examples)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    batch = trainer.data_collator(rows)
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
        total, count = 0.0, 0
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            target = torch.tensor(e["labels"][1:])
            keep = target != IGNORE_INDEX
            total += F.cross_entropy(logits[keep], target[keep], reduction="sum")
            count += int(keep.sum())
    assert torch.allclose(packed, total / count, atol=1e-5)


def test_too_long_examples_are_truncated_or_dropped_and_counted(tok):
    short = {"messages": CONVERSATION[1:3]}
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "la " * 40}]}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "4"}]}
    n_short = len(tokenize_chat(tok, short["messages"])[0])
    max_len = n_short + 2
    records = [short, long_answer, long_prompt]

    kept, stats = tokenize_examples(tok, records, max_len, too_long="drop")
    assert (stats.n_in, stats.n_kept, stats.n_dropped_too_long, stats.n_truncated) == (3, 1, 2, 0)
    assert kept[0]["input_ids"] == tokenize_chat(tok, short["messages"])[0]

    kept, stats = tokenize_examples(tok, records, max_len, too_long="truncate")
    # long_answer keeps its first tokens (some answer tokens remain); long_prompt loses its whole answer
    assert (stats.n_kept, stats.n_truncated, stats.n_dropped_no_target, stats.n_dropped_too_long) == (2, 2, 1, 0)
    assert all(len(e["input_ids"]) <= max_len for e in kept)
    assert len(kept[1]["input_ids"]) == max_len
    assert kept[1]["input_ids"] == tokenize_chat(tok, long_answer["messages"])[0][:max_len]
    assert stats.n_target_tokens == sum(t != IGNORE_INDEX for e in kept for t in e["labels"])


# ----------------------------------------------------------------------------- options


def test_trainer_options_reach_sft_config_and_unknown_ones_are_rejected(tmp_path):
    cfg = load_config(
        None, ["sft.lr=1e-4", "sft.grad_accum=4", "sft.lr_scheduler=linear", "sft.trainer_args.adam_beta2=0.95"]
    ).sft
    args = build_sft_config(cfg, tmp_path, max_length=32, seed=3, has_eval=False)
    assert (args.learning_rate, args.gradient_accumulation_steps, args.adam_beta2, args.seed) == (1e-4, 4, 0.95, 3)
    assert (
        getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "linear"
        and args.max_length == 32
        and args.output_dir == str(tmp_path)
    )
    with pytest.raises(ConfigError, match=r"sft.trainer_args.adam_beta3.*did you mean 'sft.trainer_args.adam_beta\d'"):
        build_sft_config(SFTStageConfig(trainer_args={"adam_beta3": 0.9}), tmp_path, 32, 0, False)
    with pytest.raises(ConfigError, match=r"sft.trainer_args.learning_rate: set sft.lr instead"):
        build_sft_config(SFTStageConfig(trainer_args={"learning_rate": 0.1}), tmp_path, 32, 0, False)
    with pytest.raises(ConfigError, match=r"unknown config key 'sft.learning_rate'"):
        load_config(None, ["sft.learning_rate=0.1"])
    with pytest.raises(ConfigError, match="save_total_limit"):
        load_config(None, ["sft.save_total_limit=1"])


def test_only_marked_checkpoints_are_resumed_from(tmp_path):
    sd = StageDir(tmp_path / "sft")
    for step, marked in ((2, True), (4, True), (6, False)):
        d = sd.checkpoints / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
        if marked:
            (d / CHECKPOINT_MARKER).write_text("1")
    (sd.checkpoints / "checkpoint-8").mkdir()  # a kill before anything was written
    assert sd.latest_checkpoint().name == "checkpoint-4"
    assert sorted(p.name for p in sd.remove_incomplete_checkpoints()) == ["checkpoint-6", "checkpoint-8"]
    assert sorted(p.name for p in sd.checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert StageDir(tmp_path / "missing").latest_checkpoint() is None


# ----------------------------------------------------------------------------- the stage


def _prepare_run(tmp_path, tok, name, extra=()):
    overrides = [
        f"run.root={tmp_path}",
        f"run.name={name}",
        "data.tasks.n_sft_train=96",
        "data.tasks.n_sft_eval=16",
        "sft.batch_size=8",
        "sft.max_steps=8",
        "sft.save_steps=2",
        "sft.logging_steps=1",
        "sft.lr=3e-3",
        "sft.max_new_tokens=6",
        "sft.n_samples=3",
        *extra,
    ]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    make_fake_upstream(cfg.run_dir, cfg, "pretrain", tokenizer=tok, n_layer=2, n_embd=32, n_head=2, n_positions=64)
    return cfg, ["--config", str(ROOT / "configs" / "tiny.yaml"), *overrides]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_stage_trains_resumes_after_a_kill_and_is_not_rerun(tok, tmp_path, monkeypatch):
    import pipeline.sft as sft_lib
    from stages import sft as stage

    # an uninterrupted reference run
    cfg_a, argv_a = _prepare_run(tmp_path, tok, "a")
    assert stage.main(argv_a) == 0
    sd_a = StageDir.of(cfg_a.run_dir, "sft")
    manifest = json.loads(sd_a.manifest_path.read_text())
    losses = [r["train/loss"] for r in sd_a.read_metrics() if "train/loss" in r]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    assert set(manifest["metrics"]) >= {"train_loss", "val_loss", "checker_accuracy", "pretrain_checker_accuracy"}
    assert len(manifest["samples"]) == 3 and set(manifest["samples"][0]) == {
        "prompt",
        "response",
        "expected",
        "correct",
    }
    pre = _weights(cfg_a.run_dir / "pretrain" / "artifact")
    post = _weights(sd_a.artifact)
    assert any(not torch.equal(pre[k], post[k]) for k in pre)

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    assert AutoModelForCausalLM.from_pretrained(sd_a.artifact).config.model_type == "gpt2"
    art_tok = AutoTokenizer.from_pretrained(sd_a.artifact)
    assert "{% generation %}" in art_tok.chat_template
    ids = art_tok.convert_tokens_to_ids
    assert GenerationConfig.from_pretrained(sd_a.artifact).eos_token_id == [ids("<|end|>"), ids("<|endoftext|>")]
    assert not (sd_a.artifact / "training_args.bin").exists()

    # the same run, killed right after checkpoint-4 was written; a half-written checkpoint-6 lies around
    cfg_b, argv_b = _prepare_run(tmp_path, tok, "b")
    original = sft_lib.CheckpointMarker.on_save

    def on_save_then_die(self, args, state, control, **kw):
        original(self, args, state, control, **kw)
        if state.global_step == 4:
            half = Path(args.output_dir) / "checkpoint-6"
            half.mkdir()
            (half / "model.safetensors").write_bytes(b"garbage")
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(sft_lib.CheckpointMarker, "on_save", on_save_then_die)
    with pytest.raises(KeyboardInterrupt):
        stage.main(argv_b)
    monkeypatch.setattr(sft_lib.CheckpointMarker, "on_save", original)
    sd_b = StageDir.of(cfg_b.run_dir, "sft")
    assert sd_b.state(json.loads(sd_b.fingerprint_path.read_text())["fingerprint"]) == "partial"

    assert stage.main(argv_b) == 0
    manifest_b = json.loads(sd_b.manifest_path.read_text())
    assert manifest_b["resumed_from"].endswith("checkpoint-4")
    steps = [r["step"] for r in sd_b.read_metrics() if "train/loss" in r]
    assert steps == list(range(1, 9))  # no step logged twice, none missing
    wa, wb = _weights(sd_a.artifact), _weights(sd_b.artifact)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)  # resumed == never interrupted
    assert manifest_b["metrics"]["train_loss"] == pytest.approx(manifest["metrics"]["train_loss"], abs=1e-5)

    # finished: running again does nothing
    before = sd_b.manifest_path.stat().st_mtime_ns, sorted(p.name for p in sd_b.checkpoints.iterdir())
    assert stage.main(argv_b) == 0
    assert (sd_b.manifest_path.stat().st_mtime_ns, sorted(p.name for p in sd_b.checkpoints.iterdir())) == before


def test_sigterm_saves_a_checkpoint_and_the_next_run_resumes(tok, tmp_path, monkeypatch):
    import signal

    from pipeline.training import StopSignal
    from stages import sft as stage

    cfg, argv = _prepare_run(tmp_path, tok, "term", ["sft.max_steps=6", "sft.save_steps=100"])
    original = StopSignal.on_step_end

    def term_at_step_3(self, args, state, control, **kw):
        if state.global_step == 3 and not self.signum:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by StopSignal: save, then stop
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(StopSignal, "on_step_end", term_at_step_3)
    assert stage.main(argv) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    sd = StageDir.of(cfg.run_dir, "sft")
    assert sd.latest_checkpoint().name == "checkpoint-3"  # not a save_steps multiple
    assert not sd.manifest_path.exists() and not (sd.artifact / "model.safetensors").exists()
    monkeypatch.setattr(StopSignal, "on_step_end", original)
    assert stage.main(argv) == 0
    m = json.loads(sd.manifest_path.read_text())
    assert m["resumed_from"].endswith("checkpoint-3") and m["metrics"]["steps"] == 6


def test_non_finite_loss_stops_with_the_step(tmp_path):
    from types import SimpleNamespace

    from pipeline.runs import StageError
    from pipeline.sft import METRIC_KEYS
    from pipeline.training import MetricsCallback

    sd = StageDir(tmp_path / "sft")
    cb = MetricsCallback(sd.append_metrics, METRIC_KEYS, "sft")
    args = SimpleNamespace(output_dir=str(sd.checkpoints))
    state = SimpleNamespace(global_step=7, is_world_process_zero=True)
    cb.on_log(args, state, None, logs={"loss": 1.5})
    with pytest.raises(StageError, match="loss is nan at step 7"):
        cb.on_log(args, state, None, logs={"loss": float("nan")})
    assert StageDir(tmp_path / "sft").read_metrics() == [{"step": 7, "train/loss": 1.5}]


def test_external_model_gets_chat_tokens_and_needs_no_pretrain_stage(tmp_path):
    """sft.init_from: any HF causal LM dir; its tokenizer gains the chat tokens/template, embeddings grow."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from stages import sft as stage

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(["How many letters are in king? 4"] * 10, trainer=trainer)
    ext_tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    ext = tmp_path / "external"
    ext_tok.save_pretrained(ext)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(ext_tok), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    ).save_pretrained(ext)
    n_before = len(ext_tok)

    overrides = [
        f"run.root={tmp_path}",
        "run.name=ext",
        f"sft.init_from={ext}",
        "data.tasks.n_sft_train=32",
        "data.tasks.n_sft_eval=8",
        "sft.batch_size=8",
        "sft.max_steps=2",
        "sft.max_new_tokens=4",
    ]
    assert stage.main(["--config", str(ROOT / "configs" / "tiny.yaml"), *overrides]) == 0
    art = tmp_path / "ext" / "sft" / "artifact"
    tok = AutoTokenizer.from_pretrained(art)
    model = AutoModelForCausalLM.from_pretrained(art)
    assert "{% generation %}" in tok.chat_template and tok.pad_token is not None
    assert len(tok) > n_before and model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert not (tmp_path / "ext" / "pretrain").exists()


def test_bad_dataset_record_fails_the_stage_with_its_location(tok, tmp_path, capsys):
    from stages import sft as stage

    bad = tmp_path / "qa.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    _, argv = _prepare_run(tmp_path, tok, "bad", [f"sft.dataset.source={bad}"])
    assert stage.main(argv) == 2
    assert f"{bad}:2: record has 'question' but no field 'answer'" in capsys.readouterr().err


def test_finetuned_model_beats_the_pretrained_one_on_held_out_questions(tok, tmp_path):
    """Letter counting on held-out words: a random 'pretrained' model answers none; 300 SFT steps
    (about 7 s on one thread) reach 1.0 (measured: 0.0 -> 1.0 on the 40 held-out prompts)."""
    from stages import sft as stage

    extra = [
        "data.tasks.kinds=count",
        "data.tasks.n_sft_train=400",
        "data.tasks.n_sft_eval=40",
        "sft.max_steps=300",
        "sft.batch_size=16",
        "sft.save_steps=1000",
        "sft.logging_steps=50",
        "sft.max_new_tokens=8",
    ]
    cfg, argv = _prepare_run(tmp_path, tok, "acc", extra)
    assert stage.main(argv) == 0
    m = json.loads(StageDir.of(cfg.run_dir, "sft").manifest_path.read_text())["metrics"]
    assert m["n_checker_prompts"] == 40
    assert m["pretrain_checker_accuracy"] <= 0.1
    assert m["checker_accuracy"] >= 0.5
    assert m["checker_accuracy"] >= m["pretrain_checker_accuracy"] + 0.4


def _launch_cmd(accel: str) -> list[str]:
    return accelerate_launch(ROOT / "configs" / "accelerate" / accel)


def _launch_env() -> dict[str, str]:
    return child_env()


@pytest.mark.slow
@pytest.mark.parametrize("accel", ["ddp.yaml", "zero2.yaml", "zero3.yaml"])
def test_two_processes_run_the_stage(tok, tmp_path, accel):
    if accel.startswith("zero"):
        pytest.importorskip("deepspeed")
    cfg, argv = _prepare_run(tmp_path, tok, accel.split(".")[0], ["sft.max_steps=4"])
    cmd = [*_launch_cmd(accel), "-m", "stages.sft", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=_launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sd = StageDir.of(cfg.run_dir, "sft")
    m = json.loads(sd.manifest_path.read_text())
    assert m["metrics"]["steps"] == 4 and m["metrics"]["val_loss"] is not None
    # two processes really trained: 96 examples / (8 per process x 2) = 6 steps per epoch
    epochs = [r["train/epoch"] for r in sd.read_metrics() if "train/loss" in r]
    assert epochs[-1] == pytest.approx(4 / 6)
    ckpt = sd.latest_checkpoint()
    assert ckpt.name == "checkpoint-4" and (ckpt / "rng_state_1.pth").is_file()  # both ranks saved
    pre, post = _weights(cfg.run_dir / "pretrain" / "artifact"), _weights(sd.artifact)
    assert all(post[k].shape == v.shape for k, v in pre.items())  # gathered, not shards (ZeRO-2 adds the tied lm_head)
    assert any(not torch.equal(pre[k], post[k]) for k in pre)


@pytest.mark.slow
@pytest.mark.parametrize("accel", ["ddp.yaml", "zero3.yaml"])
def test_sigkilled_multiprocess_run_resumes(tok, tmp_path, accel):
    import signal
    import time

    if accel.startswith("zero"):
        pytest.importorskip("deepspeed")
    cfg, argv = _prepare_run(tmp_path, tok, "kill", ["sft.max_steps=40", "sft.save_steps=2"])
    sd = StageDir.of(cfg.run_dir, "sft")
    cmd = [*_launch_cmd(accel), "-m", "stages.sft", *argv]
    p = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_launch_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 400
    while time.time() < deadline and p.poll() is None and sd.latest_checkpoint() is None:
        time.sleep(0.05)
    import psutil  # an accelerate dependency

    # the launcher and both workers (torchrun starts each worker in its own session), maybe mid-checkpoint
    for proc in [*psutil.Process(p.pid).children(recursive=True), psutil.Process(p.pid)]:
        proc.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    killed_at = sd.latest_checkpoint()
    assert killed_at is not None, err[-3000:]
    assert not sd.manifest_path.exists()
    if accel.startswith("zero"):  # DeepSpeed's checkpoint loader unpickles: refused before any load, unless allowed
        proc = subprocess.run(cmd, cwd=ROOT, env=_launch_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0 and not sd.manifest_path.exists(), proc.stderr[-4000:]
        assert f"stage 'sft' would resume from {killed_at} under DeepSpeed" in proc.stderr, proc.stderr[-4000:]
        assert f"{ALLOW_PICKLE_KEY}=true" in proc.stderr and sd.latest_checkpoint() == killed_at
        cmd = [*cmd, f"{ALLOW_PICKLE_KEY}=true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads(sd.manifest_path.read_text())
    assert m["resumed_from"] is not None and m["metrics"]["steps"] == 40
    steps = [r["step"] for r in sd.read_metrics() if "train/loss" in r]
    assert steps == list(range(1, 41))


def test_diverged_or_untrained_model_fails_the_stage_without_an_artifact(tok, tmp_path, capsys):
    """Issue 17: lr 1e12 turns the weights non-finite in a few steps, before any loss is logged."""
    from stages import sft as stage

    extra = ["sft.lr=1e12", "sft.max_steps=3", "sft.logging_steps=10", "sft.save_steps=100"]
    cfg, argv = _prepare_run(tmp_path, tok, "nan", extra)
    assert stage.main(argv) != 0
    err = capsys.readouterr().err
    assert "sft:" in err and "weights are not finite" in err and "sft.lr" in err
    sd = StageDir.of(cfg.run_dir, "sft")
    assert not sd.manifest_path.exists() and not (sd.artifact / "model.safetensors").exists()


def test_a_divergence_stops_before_its_checkpoint_and_the_good_ones_stay(tok, tmp_path, capsys):
    """Issue 17: checkpoints every step and no loss logged; the step whose weights went non-finite is not saved,
    so resuming can only start from a good checkpoint."""
    from safetensors.torch import load_file

    from stages import sft as stage

    extra = ["sft.lr=1e12", "sft.max_steps=6", "sft.logging_steps=10", "sft.save_steps=1", "sft.save_total_limit=0"]
    cfg, argv = _prepare_run(tmp_path, tok, "nan_ckpt", extra)
    assert stage.main(argv) != 0
    err = capsys.readouterr().err
    assert "sft: the weights are not finite at step" in err and "before the checkpoint of this step" in err
    bad_step = int(err.split("not finite at step ")[1].split()[0])
    sd = StageDir.of(cfg.run_dir, "sft")
    kept = sd.list_checkpoints()
    assert [s for s, _ in kept] == list(range(1, bad_step)) and not sd.manifest_path.exists()
    for _, path in kept:
        assert all(bool(torch.isfinite(t).all()) for t in load_file(path / "model.safetensors").values())
