"""What a user sees when something is wrong: one table row per bad input or fault, with its exit code and message.

Each row of ``FAULTS`` is one thing a user can get wrong or run into, and reads like a shell session:

- ``id``: what is wrong (the test id, e.g. ``test_fault[data-bad-json-line]``);
- ``setup``: what is on disk before the command (a config file, a fake finished run, a dataset file, a corrupt
  checkpoint, another process holding a stage's lock...), written into the test's own folder, which is the current
  folder while the row runs: the run folder is the default ``runs/tiny``, and paths in commands and messages are
  relative to it as a user's would be;
- ``command``: what the user runs, without ``python -m``: ``pipeline ...`` (what every ``make`` target runs) or
  ``stages.<stage> ...`` (one stage, as the orchestrator launches it);
- ``rc``: the exit code (2: a config, usage, data, stale-stage, corrupt-file, lock or export-path error);
- ``says``: a fragment of what the command printed (stderr, or stdout for ``status``); ``{tmp}`` is the folder's
  absolute path, ``{repo}`` this checkout, ``{pid}``/``{holder}`` the PID and command line of a lock holder;
- ``keeps``: what is left as it was: ``all`` (the folder's file listing and bytes before == after) or ``user``
  (every file that was there is still there with the same bytes; a stage run in-process may add its own
  bookkeeping, e.g. ``runs/tiny/sft/fingerprint.json`` of the start it refused). Lock files and the input-hash
  cache (``.lock``, ``.input_hashes.json``) are the pipeline's bookkeeping, never compared.

Every row also checks that no traceback is shown, that no stage process is launched (``pipeline run`` decides
everything here before it would launch one) and that nothing is moved aside or published (``StageDir.move_aside``
and the export copy are replaced by failures). Entry points run in-process, so the whole table takes seconds;
upstream stages are fakes (``tests/fake_stages/artifacts.make_fake_run``: a tiny tokenizer and 2-layer models,
made once per set of stages and copied). Only the lock rows start a process: a tiny Python that takes a stage
folder's lock with the project's own code and sleeps. The one row that trains (``data-skip-bad-record``) runs one
step of the tiny fake SFT model.

Signals (SIGTERM/SIGINT: a checkpoint, then exit code 143/130) are not in this table: showing them needs a stage that
really trains when the signal arrives, which takes tens of seconds; ``tests/test_signals.py`` (``make test-slow``)
covers every training stage.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.__main__ import main as pipeline_main
from pipeline.config import load_config, to_yaml
from pipeline.lineage import all_fingerprints, input_contents
from pipeline.runs import StageDir
from tests.fake_stages.artifacts import make_fake_run
from tests.helpers_launch import child_env

REPO = Path(__file__).resolve().parents[1]
ALL = ("tokenizer", "pretrain", "sft", "reward", "ppo")
BOOKKEEPING = {".lock", ".input_hashes.json"}
"""Files the pipeline itself rewrites as it looks at a run (never compared by ``keeps``)."""


# ----------------------------------------------------------------------------- the scene a row sets up


class Scene:
    """The test's folder (the current folder while the row runs) and ways to fill it."""

    def __init__(self, tmp: Path, bases: Path) -> None:
        self.tmp = tmp
        self.bases = bases
        self.values = {"tmp": str(tmp), "repo": str(REPO), "repo_parent": str(REPO.parent)}
        self.procs: list[subprocess.Popen] = []

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def fake_run(self, *stages: str) -> None:
        """``runs/tiny`` with ``stages`` done (made once per set of stages, copied)."""
        base = self.bases / "-".join(stages)
        if not base.exists():
            _make_run(base / "runs", stages=stages)
        shutil.copytree(base / "runs", self.tmp / "runs")

    def hold(self, stage: str, begin: bool = True) -> None:
        """Another process holding ``stage``'s lock: started on it (``begin``, with the current config's
        fingerprint, as a stage's main process does), or holding the folder as it is."""
        self.write("holder.py", HOLDER)
        root = f"runs/tiny/{stage}"
        cmd = [sys.executable, "holder.py", root] + ([all_fingerprints(load_config(None))[stage]] if begin else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=child_env(), cwd=self.tmp)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        self.values |= {"pid": str(proc.pid), "holder": shlex.join(cmd)}


HOLDER = """\
import sys, time
from pathlib import Path
from pipeline.runs import StageDir
sd = StageDir(Path(sys.argv[1]))
sd.begin(sys.argv[2], "from: holder\\n") if len(sys.argv) > 2 else sd.lock()
print("locked", flush=True)
time.sleep(120)
"""


def _make_run(root: Path, *overrides: str, stages: tuple[str, ...] = ALL) -> None:
    """``make_fake_run``, plus what a real stage also leaves: its resolved ``config.yaml`` (so a stale stage names
    the changed key) and the content hashes of the user files it read (so it names the changed file)."""
    make_fake_run(root, *overrides, stages=stages)
    cfg = load_config(None, overrides)  # the run as the rows' commands see it: run.root=runs (the default)
    for stage in stages:
        sd = StageDir.of(root / cfg.run.name, stage)
        (sd.root / "config.yaml").write_text(to_yaml(cfg))
        manifest = json.loads(sd.manifest_path.read_text())
        manifest["input_contents"] = input_contents(load_config(None, [f"run.root={root}", *overrides]), stage)
        sd.manifest_path.write_text(json.dumps(manifest, indent=1))


# ----------------------------------------------------------------------------- setups (each returns a callable)

Setup = Callable[[Scene], object]


def config(text: str) -> Setup:
    """``c.yaml`` holding ``text``."""
    return lambda s: s.write("c.yaml", text)


def run_of(*stages: str) -> Setup:
    """A fake run with ``stages`` done (all five training stages when none are named)."""
    return lambda s: s.fake_run(*(stages or ALL))


def dataset(name: str, content: str | bytes, upto: str = "pretrain") -> Setup:
    """A fake run done up to ``upto`` and a dataset file ``name``."""

    def setup(s: Scene) -> None:
        s.fake_run(*ALL[: ALL.index(upto) + 1])
        s.write(name, content)

    return setup


def then(*setups: Setup) -> Setup:
    """``setups`` one after the other."""

    def setup(s: Scene) -> None:
        for step in setups:
            step(s)

    return setup


def edit(path: str, change: Callable[[bytes], bytes]) -> Setup:
    """Rewrite the file ``path`` with ``change(its bytes)``."""
    return lambda s: (s.tmp / path).write_bytes(change((s.tmp / path).read_bytes()))


def delete(path: str) -> Setup:
    """Delete the file or folder ``path``."""
    return lambda s: shutil.rmtree(s.tmp / path) if (s.tmp / path).is_dir() else (s.tmp / path).unlink()


def cut(n: int) -> Callable[[bytes], bytes]:
    """A file cut off after ``n`` bytes (negative: ``-n`` bytes short), as a kill or a full disk leaves it."""
    return lambda data: data[:n]


def hold(stage: str, begin: bool = True) -> Setup:
    """Another process holding ``stage``'s lock (see ``Scene.hold``)."""
    return lambda s: s.hold(stage, begin)


def partial_pretrain(broken: str) -> Setup:
    """Tokenizer done; pretrain stopped after two checkpoints, the newest with the file ``broken`` cut off."""

    def setup(s: Scene) -> None:
        import torch
        from safetensors.torch import save

        s.fake_run("tokenizer")
        sd = StageDir.of(Path("runs/tiny"), "pretrain")
        sd.begin(all_fingerprints(load_config(None))["pretrain"], to_yaml(load_config(None)))
        files = {"model.safetensors": save({"w": torch.zeros(16)}), "optimizer.bin": _torch_bytes(),
                 "random_states_0.pkl": pickle.dumps({"python": [1, 2, 3]})}  # fmt: skip
        for step in (1, 2):
            with sd.writing_checkpoint(step, keep=2) as ckpt:
                for name, data in files.items():
                    (ckpt / name).write_bytes(data[: len(data) // 2] if step == 2 and name == broken else data)
                state = '{"step": ' if step == 2 and broken == "trainer_state.json" else json.dumps({"step": step})
                (ckpt / "trainer_state.json").write_text(state)
        sd.unlock()

    return setup


def _torch_bytes() -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"exp_avg": torch.zeros(64)}, buf)
    return buf.getvalue()


def run_reading(name: str, content: str) -> Setup:
    """A fake run whose sft (and what follows) read the dataset file ``name`` (``sft.dataset.source={name}``)."""

    def setup(s: Scene) -> None:
        s.write(name, content)
        _make_run(s.tmp / "runs", f"sft.dataset.source={name}")

    return setup


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Fault:
    id: str
    setup: Setup | None
    command: str
    rc: int
    says: str
    keeps: str = "all"


SFT_OK = '{"prompt": "What is 1 + 1?", "completion": "2"}\n'
PAIR_OK = '{"prompt": "q%d", "chosen": "yes", "rejected": "no"}\n'
CKPT = "runs/tiny/pretrain/checkpoints/step_000002"

FAULTS = [
    # --- config: keys, types and values, in a file or on the command line (checked at load: nothing runs)
    Fault("config-unknown-key", config("pretrain:\n  max_step: 7\n"), "pipeline status --config c.yaml", 2, "error: c.yaml: unknown config key 'pretrain.max_step'; did you mean 'pretrain.max_steps'?"),
    Fault("config-unknown-key-cli", None, "pipeline status sft.lrr=1", 2, "error: command line: unknown config key 'sft.lrr'; did you mean 'sft.lr'?"),
    Fault("config-unknown-section", None, "pipeline run all modle.n_layer=2", 2, "error: command line: unknown config key 'modle'; did you mean 'model'?"),
    Fault("config-not-an-integer", None, "pipeline status pretrain.max_steps=abc", 2, "error: command line: pretrain.max_steps: expected an integer, got 'abc'"),
    Fault("config-not-a-number", None, "pipeline run sft sft.lr=1e-4x", 2, "error: command line: sft.lr: expected a number, got '1e-4x'"),
    Fault("config-nan", None, "pipeline status reward.lr=nan", 2, "reward.lr must be a number other than NaN or inf, got 'nan'"),
    Fault("config-not-a-bool", None, "pipeline status sft.packing=maybe", 2, "error: command line: sft.packing: expected true/false, got 'maybe'"),
    Fault("config-not-a-choice", None, "pipeline status tokenizer.kind=wordpiece", 2, "tokenizer.kind: 'wordpiece' is not one of 'bpe', 'char', 'gpt2'"),
    Fault("config-not-a-choice-in-file", config("sft:\n  dataset:\n    on_bad_record: ignore\n"), "pipeline status --config c.yaml", 2, "error: c.yaml: sft.dataset.on_bad_record: 'ignore' is not one of 'error', 'skip'"),
    Fault("config-value-for-a-section", config("pretrain: 3\n"), "pipeline status --config c.yaml", 2, "error: c.yaml: pretrain: expected a mapping for section PretrainConfig, got 3"),
    Fault("config-negative-count", None, "pipeline status pretrain.warmup_steps=-5", 2, "pretrain.warmup_steps must be >= 0, got -5"),
    Fault("config-zero-steps", None, "pipeline status pretrain.max_steps=0", 2, "pretrain.max_steps must be >= 1, got 0"),
    Fault("config-zero-layers", None, "pipeline status model.n_layer=0", 2, "model.n_layer must be >= 1, got 0"),
    Fault("config-negative-lr", None, "pipeline status sft.lr=-1", 2, "sft.lr must be > 0, got -1.0"),
    Fault("config-fraction-out-of-range", None, "pipeline status data.corpus.val_fraction=1.5", 2, "data.corpus.val_fraction must be in (0, 1), got 1.5"),
    Fault("config-k-out-of-range", None, "pipeline status data.tasks.responses_per_prompt=9", 2, "data.tasks.responses_per_prompt must be in 2..8, got 9"),
    Fault("config-vocab-too-small", None, "pipeline status tokenizer.vocab_size=100", 2, "tokenizer.vocab_size=100: byte-level BPE needs >= 263"),
    Fault("config-threshold-out-of-range", None, "pipeline report report.min_reward_pair_accuracy=2", 2, "report.min_reward_pair_accuracy must be in [0, 1], got 2.0"),
    Fault("config-negative-kl", None, "pipeline status ppo.kl_coef=-1", 2, "ppo.kl_coef must be >= 0 and ppo.kl_target > 0"),
    Fault("config-heads-do-not-divide", None, "pipeline status model.n_embd=100 model.n_head=3", 2, "model.n_embd=100 is not divisible by model.n_head=3"),
    Fault("config-truncated-ppo-sampling", None, "pipeline status ppo.top_k=50", 2, "ppo.top_k=50 / ppo.top_p=1.0: PPO samples from the full distribution"),
    Fault("config-export-without-hf", None, "pipeline export export.formats=[gguf]", 2, "export.formats=['gguf'] must include hf (the GGUF is made from it)"),
    Fault("config-duplicate-section", config("pretrain:\n  lr: 1e-3\nsft:\n  lr: 1e-4\npretrain:\n  max_steps: 7\n"), "pipeline status --config c.yaml", 2, "error: c.yaml: duplicate key 'pretrain' at line 5 (first written at line 1)"),
    Fault("config-duplicate-key", config("pretrain:\n  lr: 1e-3\n  lr: 2e-3\n"), "pipeline status --config c.yaml", 2, "error: c.yaml: duplicate key 'lr' at line 3 (first written at line 2)"),
    Fault("config-empty-file", config(""), "pipeline status --config c.yaml", 2, "error: c.yaml: the file is empty (no sections); an empty config would run the code defaults"),
    Fault("config-only-comments", config("# pretrain:\n#   lr: 1e-3\n"), "pipeline run all --config c.yaml", 2, "error: c.yaml: the file is empty (no sections)"),
    Fault("config-missing-file", None, "pipeline run all --config nope.yaml", 2, "error: config file not found: nope.yaml"),
    Fault("config-not-yaml", config("pretrain: [1, 2\n"), "pipeline status --config c.yaml", 2, "error: c.yaml: not valid YAML"),
    Fault("config-not-a-mapping", config("- pretrain\n- sft\n"), "pipeline status --config c.yaml", 2, "error: c.yaml: the top level must be a mapping of sections"),
    Fault("config-cli-key-blamed-on-cli", config("pretrain:\n  lr: 1e-3\n"), "pipeline status --config c.yaml pretrain.max_steps=abc", 2, "error: command line (over c.yaml): pretrain.max_steps: expected an integer, got 'abc'"),
    Fault("config-file-key-blamed-on-file", config("pretrain:\n  lr: abc\n"), "pipeline status --config c.yaml pretrain.max_steps=9", 2, "error: c.yaml: pretrain.lr: expected a number, got 'abc'"),
    Fault("config-override-without-value", None, "pipeline status pretrain.lr", 2, "error: command line: override 'pretrain.lr' is not of the form section.key=value"),
    Fault("config-override-bad-yaml", None, "pipeline status pretrain.lr=[1,", 2, "error: command line: override 'pretrain.lr=[1,': not a valid value"),
    Fault("config-override-into-a-value", config("run:\n  seed: 3\n"), "pipeline status --config c.yaml run.seed.x=3", 2, "error: command line (over c.yaml): override 'run.seed.x': 'seed' is a value, not a section"),
    Fault("config-unknown-option", None, "pipeline status --bogus", 2, "python -m pipeline: error: unrecognized arguments: --bogus"),
    Fault("config-unknown-stage", None, "pipeline run sfft", 2, "error: argument target: invalid choice: 'sfft'"),
    Fault("config-nproc-without-ddp", None, "pipeline run pretrain --nproc 2", 2, "error: LAUNCH=cpu runs one process (NPROC=2); use LAUNCH=ddp NPROC=2"),
    Fault("config-stage-cli", None, "stages.pretrain pretrain.lr=abc", 2, "error: command line: pretrain.lr: expected a number, got 'abc'"),
    Fault("config-stage-cli-unknown-option", None, "stages.sft --bogus", 2, "python -m stages.sft: error: unrecognized arguments: --bogus"),
    Fault("config-not-utf8", config(b"run:\n  name: caf\xe9\n"), "pipeline status --config c.yaml", 2, "error: c.yaml:2: not valid UTF-8 (byte 0xe9); save the file as UTF-8"),
    Fault("config-another-trainers-name", None, "pipeline status pretrain.learning_rate=1e-3", 2, "unknown config key 'pretrain.learning_rate'; did you mean 'pretrain.lr'?"),
    Fault("config-dataset-max-records", None, "pipeline status sft.dataset.max_records=-1", 2, "sft.dataset: max_records must be >= 0 (0: all records), got -1"),
    Fault("config-dataset-eval-fraction", None, "pipeline status reward.dataset.eval_fraction=2", 2, "reward.dataset: eval_fraction must be in [0, 1), got 2.0"),
    # load-time checks of values that used to fail only when their stage started (after the ones before it ran)
    Fault("config-adam-beta", None, "pipeline run all pretrain.beta1=2", 2, "error: command line: pretrain: pretrain.beta1 must be in [0, 1), got 2.0"),
    Fault("config-eval-interval-zero", None, "pipeline run all pretrain.eval_interval=0", 2, "pretrain.eval_interval must be >= 1, got 0"),
    Fault("config-negative-threads", None, "pipeline run all pretrain.num_threads=-1", 2, "pretrain.num_threads must be >= 0 (0: torch's default), got -1"),
    Fault("config-unknown-scheduler", None, "pipeline run all sft.lr_scheduler=cosinus", 2, "sft.lr_scheduler='cosinus' is not a transformers scheduler; valid: linear, cosine"),
    Fault("config-scheduler-needs-kwargs", None, "pipeline run all reward.lr_scheduler=warmup_stable_decay", 2, "reward.lr_scheduler=warmup_stable_decay needs its arguments"),
    Fault("config-unknown-task-kind", None, "pipeline run all data.tasks.kinds=[say,sum]", 2, "data.tasks.kinds: unknown task kind(s) ['sum']; valid kinds: add, spell, reverse, sort, count, say"),
    Fault("config-ppo-over-context", None, "pipeline run all ppo.max_prompt_length=250", 2, "error: command line: ppo.max_prompt_length + ppo.max_new_tokens = 250 + 32 = 282 exceeds the policy's context, model.block_size=256"),
    Fault("config-sft-over-context", config("model:\n  block_size: 128\nppo:\n  max_prompt_length: 64\nsft:\n  max_length: 256\n"), "pipeline run all --config c.yaml", 2, "error: c.yaml: sft.max_length=256 exceeds the model's context, model.block_size=128"),
    Fault("config-pretrain-over-context", None, "pipeline run all pretrain.block_size=512", 2, "pretrain.block_size=512 exceeds model.block_size=256 (the context)"),
    Fault("config-negative-seed", None, "pipeline run all run.seed=-1", 2, "run.seed must be in [0, 2**32) (numpy's seed range), got -1"),
    Fault("config-run-name-a-path", None, "pipeline run all run.name=../elsewhere", 2, "run.name must be a plain folder name (no '/', not '.' or '..'), got '../elsewhere'"),
    #
    # --- data: the fine-tuning datasets and the pretraining corpus (checked when the stage reads them)
    Fault("data-missing-file", run_of("tokenizer", "pretrain"), "stages.sft sft.dataset.source=d.jsonl", 2, "error: sft.dataset: dataset file not found: d.jsonl", "user"),
    Fault("data-bad-json-line", dataset("d.jsonl", SFT_OK + '{"prompt": "a", }\n'), "stages.sft sft.dataset.source=d.jsonl", 2, "error: sft.dataset: d.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes at column 17)", "user"),
    Fault("data-line-cut-in-a-string", dataset("d.jsonl", SFT_OK + '{"prompt": "a", "compl\n'), "stages.sft sft.dataset.source=d.jsonl", 2, "error: sft.dataset: d.jsonl:2: not valid JSON (Invalid control character at column 23)", "user"),
    Fault("data-line-not-an-object", dataset("d.jsonl", SFT_OK + "[1, 2]\n"), "stages.sft sft.dataset.source=d.jsonl", 2, "error: sft.dataset: d.jsonl:2: expected a JSON object, got list", "user"),
    Fault("data-missing-field", dataset("d.jsonl", '{"question": "What is 1 + 1?"}\n'), "stages.sft sft.dataset.source=d.jsonl", 2, "error: sft.dataset: d.jsonl:1: record has 'question' but no field 'answer'", "user"),
    Fault("data-no-schema", dataset("d.jsonl", '{"text": "hello"}\n'), "stages.sft sft.dataset.source=d.jsonl", 2, "d.jsonl:1: record fits no SFT schema (expected messages | prompt+completion | question+answer | instruction(+input)+output); fields found: text", "user"),
    Fault("data-bad-role", dataset("d.jsonl", '{"messages": [{"role": "bot", "content": "hi"}]}\n'), "stages.sft sft.dataset.source=d.jsonl", 2, "d.jsonl:1: field 'messages[0].role' is 'bot', expected one of system, user, assistant", "user"),
    Fault("data-not-utf8-jsonl", dataset("d.jsonl", SFT_OK.encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n'), "stages.sft sft.dataset.source=d.jsonl", 2, "error: sft.dataset: d.jsonl:2: not valid UTF-8 (byte 0xe9 at column 16)", "user"),
    Fault("data-not-utf8-json", dataset("d.json", b'[\n{"prompt": "caf\xe9", "completion": "x"}]'), "stages.sft sft.dataset.source=d.json", 2, "error: sft.dataset: d.json:2: not valid UTF-8 (byte 0xe9 at column 16)", "user"),
    Fault("data-not-utf8-csv", dataset("d.csv", b"prompt,completion\nhi,yo\ncaf\xe9,x\n"), "stages.sft sft.dataset.source=d.csv", 2, "error: sft.dataset: d.csv:row 2: not valid UTF-8 (byte 0xe9)", "user"),
    Fault("data-json-not-a-list", dataset("d.json", '{"prompt": "hi"}'), "stages.sft sft.dataset.source=d.json", 2, "d.json: expected a JSON list of records (or {{'data': [...]}})", "user"),
    Fault("data-unsupported-type", dataset("d.txt", "hi\n"), "stages.sft sft.dataset.source=d.txt", 2, "d.txt: unsupported file type '.txt' (use .json, .jsonl, .parquet or .csv)", "user"),
    Fault("data-not-parquet", dataset("d.parquet", "prompt,completion\n"), "stages.sft sft.dataset.source=d.parquet", 2, "error: sft.dataset: Could not open Parquet input source 'd.parquet'", "user"),
    Fault("data-empty-file", dataset("d.jsonl", ""), "stages.sft sft.dataset.source=d.jsonl", 2, "error: sft.dataset: d.jsonl: no usable SFT records (skipped 0 bad ones)", "user"),
    Fault("data-skip-bad-record", dataset("d.jsonl", SFT_OK + '{"prompt": "a", }\n'), "stages.sft sft.dataset.source=d.jsonl sft.dataset.on_bad_record=skip sft.max_steps=1", 0, "skipped 1 bad records (first: d.jsonl:2: not valid JSON", "user"),
    Fault("data-skip-leaves-nothing", dataset("d.jsonl", '{"prompt": "a", }\n[1]\n', upto="sft"), "stages.reward reward.dataset.source=d.jsonl reward.dataset.on_bad_record=skip", 2, "error: reward.dataset: d.jsonl: no usable preference records (skipped 2 bad ones)", "user"),
    Fault("data-pair-missing-field", dataset("d.jsonl", '{"prompt": "hi", "rejected": "no"}\n', upto="sft"), "stages.reward reward.dataset.source=d.jsonl", 2, "error: reward.dataset: d.jsonl:1: not a preference record (keys: prompt, rejected)", "user"),
    Fault("data-pair-tie", dataset("d.jsonl", '{"prompt": "hi", "chosen": "yo", "rejected": "yo"}\n', upto="sft"), "stages.reward reward.dataset.source=d.jsonl", 2, "d.jsonl:1: fields 'chosen' and 'rejected' are identical (a tie is not a preference)", "user"),
    Fault("data-ranking-out-of-range", dataset("d.jsonl", '{"prompt": "hi", "responses": ["a", "b"], "ranking": [0, 5]}\n', upto="sft"), "stages.reward reward.dataset.source=d.jsonl", 2, "d.jsonl:1: field 'ranking' has index 5 out of range for 2 responses", "user"),
    Fault("data-missing-eval-file", dataset("d.jsonl", "".join(PAIR_OK % i for i in range(8)), upto="sft"), "stages.reward reward.dataset.source=d.jsonl reward.dataset.eval_source=e.jsonl", 2, "error: reward.dataset: dataset file not found: e.jsonl", "user"),
    Fault("data-nothing-held-out", dataset("d.jsonl", "".join(PAIR_OK % i for i in range(8)), upto="sft"), "stages.reward reward.dataset.source=d.jsonl reward.dataset.eval_fraction=0", 2, "error: reward: no held-out preference records; set reward.dataset.eval_source or reward.dataset.eval_fraction > 0", "user"),
    Fault("data-corpus-missing-file", None, "stages.tokenizer data.corpus.source=files data.corpus.paths=[nope.txt]", 2, "error: data.corpus.paths: file not found: nope.txt", "user"),
    Fault("data-corpus-no-paths", None, "stages.tokenizer data.corpus.source=files", 2, "error: data.corpus.paths is empty: data.corpus.source=files needs .txt/.jsonl/.parquet files", "user"),
    Fault("data-corpus-missing-field", lambda s: s.write("c.jsonl", '{"text": "hello"}\n{"txt": "x"}\n'), "stages.tokenizer data.corpus.source=files data.corpus.paths=[c.jsonl]", 2, "error: c.jsonl:2: record has no field 'text' (data.corpus.text_field) (set data.corpus.on_bad_record=skip to skip such records)", "user"),
    Fault("data-corpus-empty", lambda s: s.write("c.txt", ""), "stages.tokenizer data.corpus.source=files data.corpus.paths=[c.txt] data.corpus.num_proc=1", 2, "error: no non-empty documents in data.corpus.paths=['c.txt'] (1 empty)", "user"),
    Fault("model-pretrain-init-missing", run_of("tokenizer"), "stages.pretrain pretrain.init_from=./nope", 2, "error: pretrain.init_from='./nope': not found locally", "user"),
    Fault("model-sft-init-empty-folder", then(run_of("tokenizer", "pretrain"), lambda s: (s.tmp / "m").mkdir()), "stages.sft sft.init_from=m", 2, "error: sft.init_from='m': ", "user"),
    Fault("model-chat-missing", None, "pipeline chat --model ./nope", 2, "error: --model='./nope': not found locally"),
    #
    # --- checkpoints and finished stages: corrupt, stale, broken (refused before anything runs or moves)
    Fault("ckpt-truncated-weights", partial_pretrain("model.safetensors"), "pipeline run pretrain", 2, f"{CKPT}/model.safetensors: truncated"),
    Fault("ckpt-truncated-weights-fix", partial_pretrain("model.safetensors"), "pipeline run sft", 2, f"Move it aside (mv {CKPT} {CKPT}.corrupt) to resume from the checkpoint before it, or use FORCE=1"),
    Fault("ckpt-truncated-optimizer", partial_pretrain("optimizer.bin"), "pipeline run pretrain", 2, f"{CKPT}/optimizer.bin: unreadable (BadZipFile"),
    Fault("ckpt-truncated-rng-pickle", partial_pretrain("random_states_0.pkl"), "pipeline run pretrain", 2, f"{CKPT}/random_states_0.pkl: truncated (a pickle ends with its STOP opcode)"),
    Fault("ckpt-cut-off-state", partial_pretrain("trainer_state.json"), "pipeline run pretrain", 2, f"{CKPT}/trainer_state.json: unreadable (JSONDecodeError"),
    Fault("manifest-cut-off", then(run_of(), edit("runs/tiny/sft/manifest.json", cut(40))), "pipeline run ppo", 2, "runs/tiny/sft/manifest.json: unreadable manifest (Unterminated string"),
    Fault("manifest-cut-off-fix", then(run_of(), edit("runs/tiny/sft/manifest.json", cut(40))), "pipeline run sft", 2, "move runs/tiny/sft aside (mv runs/tiny/sft runs/tiny/sft.corrupt) or run the stage with FORCE=1 (--force)"),
    Fault("manifest-not-a-manifest", then(run_of(), edit("runs/tiny/sft/manifest.json", lambda _: b"[1, 2]")), "stages.sft", 2, "error: runs/tiny/sft/manifest.json: not a manifest (a JSON list); move runs/tiny/sft aside"),
    Fault("manifest-corrupt-in-status", then(run_of(), edit("runs/tiny/sft/manifest.json", cut(40))), "pipeline status", 0, "sft        corrupt (runs/tiny/sft/manifest.json: unreadable manifest"),
    Fault("stale-config-without-force", run_of(), "pipeline run ppo sft.lr=0.0001", 2, "stage 'sft' in runs/tiny/sft was made with a different config or inputs; nothing was changed:\n  - sft.lr: 0.0005 -> 0.0001\nTo make it again with the current config, run with FORCE=1"),
    Fault("stale-in-status", run_of(), "pipeline status sft.lr=0.0001", 0, "reward     stale (input 'sft' changed (sft.lr: 0.0005 -> 0.0001))"),
    Fault("stale-stage-cli", run_of(), "stages.sft sft.lr=0.0001", 2, "error: stage 'sft' in runs/tiny/sft was made with a different config or inputs (fingerprint"),
    Fault("stale-upstream-stage-cli", run_of(), "stages.reward sft.lr=0.0001", 2, "error: stage 'reward' needs 'sft' made with the current config, but runs/tiny/sft/manifest.json has fingerprint"),
    Fault("stale-input-file", then(run_reading("d.jsonl", SFT_OK), lambda s: s.write("d.jsonl", SFT_OK * 2)), "pipeline run sft sft.dataset.source=d.jsonl", 2, "  - input sft.dataset.source file d.jsonl changed\n"),
    Fault("stale-input-file-gone", then(run_reading("d.jsonl", SFT_OK), delete("d.jsonl")), "pipeline run ppo sft.dataset.source=d.jsonl", 2, "  - input sft.dataset.source file d.jsonl is missing\n"),
    Fault("broken-artifact", then(run_of(), delete("runs/tiny/pretrain/artifact")), "pipeline run reward", 2, "error: stage 'pretrain': the manifest says done but runs/tiny/pretrain/artifact is missing or empty. Nothing was changed."),
    Fault("missing-upstream-stage-cli", run_of("tokenizer"), "stages.sft", 2, "error: stage 'sft' needs the 'pretrain' stage's artifact at runs/tiny/pretrain/artifact, which does not exist", "user"),
    Fault("missing-stage-chat", run_of("tokenizer", "pretrain"), "pipeline chat --stage sft", 2, "error: chat: stage 'sft' is not done (runs/tiny/sft/manifest.json missing); run `make sft` first"),
    Fault("export-source-truncated", then(run_of(), edit("runs/tiny/ppo/artifact/model.safetensors", cut(-100))), "stages.export", 2, "runs/tiny/ppo/artifact/model.safetensors: truncated", "user"),
    #
    # --- concurrency: another process works on the stage (its lock names it; FORCE does not take it over)
    Fault("lock-held-run", then(run_of("tokenizer", "pretrain"), hold("sft")), "pipeline run sft", 2, "error: runs/tiny/sft is in use by PID {pid} ({holder}) since "),
    Fault("lock-held-stage-cli", then(run_of("tokenizer", "pretrain"), hold("sft")), "stages.sft", 2, "error: runs/tiny/sft is in use by PID {pid} ({holder}) since "),
    Fault("lock-held-force", then(run_of(), hold("sft", begin=False)), "pipeline run sft --force sft.lr=0.0001", 2, "error: runs/tiny/sft is in use by PID {pid} ({holder}) since "),
    Fault("lock-held-in-status", then(run_of("tokenizer", "pretrain"), hold("sft")), "pipeline status", 0, "sft        running (PID {pid})"),
    #
    # --- export paths that would move the run or the repository aside (refused before anything runs)
    Fault("export-dir-run-root", run_of(), "pipeline export export.dir=runs", 2, "error: export.dir=runs: {tmp}/runs is the run root ({tmp}/runs); publishing there would move it aside. Nothing was changed"),
    Fault("export-dir-run-folder", run_of(), "pipeline export export.dir=runs/tiny", 2, "error: export.dir=runs/tiny: {tmp}/runs/tiny is the run folder"),
    Fault("export-dir-stage-folder", run_of(), "pipeline export export.dir=runs/tiny/sft", 2, "error: export.dir=runs/tiny/sft: {tmp}/runs/tiny/sft is the sft stage folder"),
    Fault("export-dir-inside-a-stage", run_of(), "pipeline export export.dir=runs/tiny/ppo/artifact", 2, "{tmp}/runs/tiny/ppo/artifact lies inside the ppo stage folder; publishing there would change that stage. Nothing was changed"),
    Fault("export-dir-holds-the-run", run_of(), "pipeline export export.dir={tmp}", 2, "error: export.dir={tmp}: {tmp} holds the run root ({tmp}/runs)"),
    Fault("export-dir-repository", run_of(), "pipeline export export.dir={repo}", 2, "error: export.dir={repo}: {repo} is this project ({repo}); publishing there would move it aside"),
    Fault("export-dir-holds-the-repository", run_of(), "pipeline export export.dir={repo_parent}", 2, "{repo_parent} holds this project ({repo})"),
    Fault("export-dir-dot", run_of(), "pipeline export export.dir=.", 2, "error: export.dir=.: not a folder name to publish the export into"),
    Fault("export-dir-dotdot", run_of(), "pipeline export export.dir=..", 2, "error: export.dir=..: not a folder name to publish the export into"),
    Fault("export-dir-filesystem-root", run_of(), "pipeline export export.dir=/", 2, "error: export.dir=/: not a folder name to publish the export into"),
    Fault("export-dir-git-folder", run_of(), "pipeline export export.dir={repo}/.git", 2, "error: export.dir={repo}/.git: {repo}/.git is a folder that is not a model export; publishing there would move it aside. Nothing was changed"),
    Fault("export-dir-a-file", run_of(), "pipeline export export.dir={repo}/README.md", 2, "{repo}/README.md is a file; publishing there would move it aside"),
    Fault("export-dir-run-all", None, "pipeline run all export.dir=runs", 2, "error: export.dir=runs: {tmp}/runs is the run root"),
    Fault("export-dir-stage-cli", run_of(), "stages.export export.dir=runs", 2, "error: export.dir=runs: {tmp}/runs is the run root", "user"),
]  # fmt: skip


# ----------------------------------------------------------------------------- running a row


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Path:
    """Fake runs made once per set of done stages, copied into each row's folder."""
    return tmp_path_factory.mktemp("fake-runs")


@pytest.fixture
def scene(tmp_path, bases, monkeypatch) -> Iterator[Scene]:
    tmp = tmp_path.resolve()
    monkeypatch.chdir(tmp)
    env = dict(os.environ)  # a stage run in-process sets ACCELERATE_USE_CPU and friends
    root, level = logging.getLogger(), logging.getLogger().level
    for h in root.handlers[:]:  # an earlier in-process stage's handler, on a stream pytest has closed since
        if type(h) is logging.StreamHandler and getattr(h.stream, "closed", False):
            root.removeHandler(h)
    kept = root.handlers[:]

    def refuse(*args, **kwargs):
        raise AssertionError(f"a fault row moved, copied or launched something: {args}")

    monkeypatch.setattr("pipeline.orchestrate._run_child", refuse)
    monkeypatch.setattr(StageDir, "move_aside", refuse)
    monkeypatch.setattr("pipeline.publish.publish", refuse)
    monkeypatch.setattr("pipeline.orchestrate.publish", refuse)
    monkeypatch.setattr("stages.export.publish", refuse)
    s = Scene(tmp, bases)
    yield s
    for proc in s.procs:
        proc.kill()
        proc.wait()
    for h in root.handlers[:]:  # a stage's own log handler (on this test's captured stderr)
        if type(h) is logging.StreamHandler and h not in kept:
            root.removeHandler(h)
    root.setLevel(level)
    os.environ.clear()
    os.environ.update(env)


def _files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (but the pipeline's bookkeeping) -> the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in BOOKKEEPING
    }


def _run(command: str) -> int:
    """``python -m <command>``, in-process: the exit code (argparse's usage errors raise SystemExit)."""
    module, *argv = shlex.split(command)
    main = pipeline_main if module == "pipeline" else importlib.import_module(module).main
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_fault(fault: Fault, scene: Scene, capsys):
    if fault.setup is not None:
        fault.setup(scene)
    before = _files(scene.tmp)
    capsys.readouterr()
    rc = _run(fault.command.format(**scene.values))
    seen = capsys.readouterr()
    shown = seen.err + seen.out
    assert rc == fault.rc, shown
    assert fault.says.format(**scene.values) in shown, shown
    assert "Traceback" not in shown, shown
    after = _files(scene.tmp)
    if fault.keeps == "all":
        assert after == before
    else:
        assert {p: after.get(p) for p in before} == before
    assert not [p for p in scene.tmp.rglob("*.old-*")]  # nothing moved aside


def test_the_table_covers_every_category():
    ids = [f.id for f in FAULTS]
    assert len(ids) == len(set(ids)) >= 45
    for prefix in ("config-", "data-", "ckpt-", "manifest-", "stale-", "lock-", "export-dir-"):
        assert any(i.startswith(prefix) for i in ids), prefix
    assert all(f.keeps in ("all", "user") for f in FAULTS)
