"""SIGKILL during one training stage, then the same command again: the stage ends byte-identical.

For each of pretrain, SFT, reward and PPO (parametrised), on the micro config of ``test_e2e`` with more steps and
frequent checkpoints, and for reward and PPO also with the default run's recipe (``test_e2e.DEFAULT_RECIPE``: a DPO
reward model with an NLL term on on-policy pairs, group PPO on its implicit reward): the upstream stage folders of
one uninterrupted reference run (built once per module and recipe) are copied into a fresh run root, where they stay
done (the fingerprints hash the config, the upstream fingerprints and the corpus's content, not the run root; the
content-hash cache ``.input_hashes.json`` is not copied and is simply computed again). Then ``python -m pipeline run
<stage>`` (the orchestrator, as ``make <stage>`` runs it) is started and its whole process group (orchestrator and
stage process) is SIGKILLed ``KILLS`` times, the same command restarted after each kill, and finally run to
completion. The stage's artifact must equal the reference's, every file byte for byte.

When each kill comes (``random.Random`` seeded per stage, placed by progress, not by the clock alone, since the
load of a shared machine changes the speed of a run two- or threefold): the reference run of the stage is watched,
which gives its checkpoint steps and how long its body spends before training, per step and after training. The
body start and the checkpoints before the last are split into four runs of equal length and one anchor is drawn
from each, in order; an attempt waits for its anchor (the body start, its ``<stage>: starting|resuming ->`` line,
when it resumes past it) and then for a random share of the reference's time from there to the next checkpoint.
One of those attempts, drawn at random, is killed instead the moment its next checkpoint starts being written
(a ``step_N.tmp`` or an unmarked ``checkpoint-N`` appears), to cut a write in half; the fifth attempt is killed at
a random moment after its last step's checkpoint (final evaluation, artifact, manifest), so that the final run
resumes from the last checkpoint. Where each kill landed (before the first checkpoint, or after which checkpoint,
at which logged step, during which checkpoint write) is printed and checked: several kills must come after a
checkpoint, and a resumed run must have gone on training, so that resuming from a checkpoint is exercised.

The stage processes run from a copy of pipeline/, stages/ and configs/ taken once per module, like ``test_e2e``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.lineage import all_fingerprints
from pipeline.runs import StageDir, lock_holder
from tests.helpers_launch import child_env
from tests.test_e2e import DEFAULT_RECIPE, MICRO

REPO = Path(__file__).resolve().parents[1]
KILLS = 5
TRAINING_STAGES = ("pretrain", "sft", "reward", "ppo")
UPSTREAM = {  # what each stage reads, transitively: copied from the reference run
    "pretrain": ("tokenizer",),
    "sft": ("tokenizer", "pretrain"),
    "reward": ("tokenizer", "pretrain", "sft"),
    "ppo": ("tokenizer", "pretrain", "sft", "reward"),
}
STEPS_KEY = {"pretrain": "max_steps", "sft": "max_steps", "reward": "max_steps", "ppo": "steps"}
# The micro config, with each training stage long enough (5-15 s of training on 2 cores) and checkpointed often
# enough (16-29 checkpoints) that kills land in the middle of training and around checkpoint writes.
LONGER = {
    "pretrain": {"max_steps": 600, "eval_interval": 200, "log_interval": 10, "ckpt_interval": 25},
    "sft": {"max_steps": 160, "save_steps": 6, "logging_steps": 4, "eval_steps": 64},
    "reward": {"max_steps": 200, "save_steps": 7, "logging_steps": 5},
    "ppo": {"steps": 80, "ckpt_interval": 5, "eval_interval": 40},
}
RECIPES = {
    "micro": [],  # the micro config's own reward and PPO: a Bradley-Terry scalar head; PPO with a value model
    "default": DEFAULT_RECIPE,  # configs/tiny.yaml's: DPO + NLL on on-policy pairs; group PPO on the implicit reward
}
CASES = [*((stage, "micro") for stage in TRAINING_STAGES), ("reward", "default"), ("ppo", "default")]
ENV = child_env(PIPELINE_PROGRESS="0")


def _configs(folder: Path) -> dict[str, Path]:
    """kill-<recipe>.yaml for each recipe (``MICRO`` with ``LONGER`` and the recipe's keys) and their corpus (task
    prompts with their answers; one file, so that the recipes share their tokenizer, pretrain and SFT stages) in
    ``folder``."""
    from pipeline.data.tasks import generate_tasks

    out = {}
    for recipe, keys in RECIPES.items():
        conf = json.loads(json.dumps(MICRO))
        conf["run"]["name"] = "kill"
        for stage, knobs in LONGER.items():
            conf[stage].update(knobs)
        for item in keys:
            key, value = item.split("=", 1)
            section, name = key.split(".")
            conf[section][name] = yaml.safe_load(value)
        conf["data"]["corpus"]["paths"] = [str(folder / "corpus.txt")]
        out[recipe] = folder / f"kill-{recipe}.yaml"
        out[recipe].write_text(yaml.safe_dump(conf))
    tasks = generate_tasks(load_config(out["micro"]).data.tasks)
    docs = [f"{r['messages'][0]['content']} {r['answer']}" for r in tasks.sft_train] * 3
    (folder / "corpus.txt").write_text("\n\n".join(docs))
    return out


class Watch:
    """One ``python -m pipeline run <stage>`` started in its own process group, its output appended to ``log``;
    :meth:`poll` notes when the stage body started (its ``<stage>: starting|resuming ->`` line) and when each
    complete checkpoint first appeared."""

    def __init__(self, cmd: list[str], cwd: Path, log: Path, sd: StageDir) -> None:
        self.sd, self.log = sd, log
        self.offset = log.stat().st_size if log.exists() else 0
        self.body: float | None = None
        """When the stage body started (time.time())."""
        self.seen: dict[int, float] = {}
        """Complete checkpoint step -> seconds after the body start it was first seen."""
        self.manifest: float | None = None
        """Seconds after the body start the manifest was first seen."""
        with open(log, "a") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=out, stderr=out, start_new_session=True)

    def poll(self) -> bool:
        """Look once; True while the command runs."""
        running = self.proc.poll() is None
        if self.body is None:
            with open(self.log, errors="replace") as f:
                f.seek(self.offset)
                text = f.read()
            stage = self.sd.stage
            if f"{stage}: starting ->" in text or f"{stage}: resuming ->" in text:
                self.body = time.time()
        if self.body is not None:
            for c in self.sd.find_checkpoints():
                if c.complete and c.step not in self.seen:
                    self.seen[c.step] = time.time() - self.body
            if self.manifest is None and self.sd.manifest_path.exists():
                self.manifest = time.time() - self.body
        return running

    def wait_for(self, pred, timeout: float, every: float) -> bool:
        """Poll until ``pred()`` holds (True), or the command ends or ``timeout`` passes (False)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.poll():
                return False
            if pred():
                return True
            time.sleep(every)
        return False

    def finish(self, timeout: float = 900) -> None:
        """Let the command run to its end; it must succeed."""
        self.wait_for(lambda: False, timeout, 0.01)
        self.poll()
        assert self.proc.wait(timeout=1) == 0, self.log.read_text()[-4000:]

    def kill(self) -> None:
        """SIGKILL the orchestrator and its stage process at once; wait until the stage folder's lock is free."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.time() + 30
        while lock_holder(self.sd.root) is not None and time.time() < deadline:
            time.sleep(0.05)
        assert lock_holder(self.sd.root) is None, f"{self.sd.root} still locked after the kill"


@dataclass
class Profile:
    """The reference run of a stage, timed from its body's start: the time before training, per step, after."""

    steps: int
    checkpoints: list[int]
    """The steps checkpointed, in order (the last is ``steps``)."""
    before: float
    per_step: float
    after: float
    body: float
    """Until the manifest was written."""

    @classmethod
    def of(cls, watch: Watch, steps: int) -> Profile:
        body = watch.manifest
        (s0, t0), (s1, t1) = min(watch.seen.items()), max(watch.seen.items())
        per_step = (t1 - t0) / (s1 - s0) if s1 > s0 else t1 / s1
        before, after = max(0.0, t0 - s0 * per_step), max(0.0, body - t1 - (steps - s1) * per_step)
        return cls(steps, sorted(watch.seen), before, per_step, after, body)

    def __str__(self) -> str:
        return (
            f"body {self.body:.1f}s: {self.before:.1f}s before training, {self.steps} steps of "
            f"{1000 * self.per_step:.0f}ms, {len(self.checkpoints)} checkpoints, {self.after:.1f}s after"
        )


@dataclass
class Reference:
    code: Path
    """The snapshot of the code every stage process runs from."""
    configs: dict[str, Path] = field(default_factory=dict)
    """Recipe -> its config file."""
    run_dirs: dict[str, Path] = field(default_factory=dict)
    """Recipe -> its uninterrupted run."""
    profiles: dict[tuple[str, str], Profile] = field(default_factory=dict)
    """(stage, recipe) -> the timings of its uninterrupted run."""


def _run_cmd(stage: str, config: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", stage, "--config", str(config), f"run.root={root}"]


def _steps(cfg, stage: str) -> int:
    return getattr(getattr(cfg, stage), STEPS_KEY[stage])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    """One uninterrupted run up to PPO per recipe, made stage by stage (each by its own command), each training
    stage timed; the default recipe's run starts from the micro run's tokenizer, pretrain and SFT stages."""
    code = tmp_path_factory.mktemp("code")
    for name in ("pipeline", "stages", "configs"):
        shutil.copytree(REPO / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
    ENV["PYTHONPATH"] = str(code)
    ref = Reference(code)
    folder = tmp_path_factory.mktemp("reference")
    ref.configs = _configs(folder)
    for recipe, config in ref.configs.items():
        cfg = load_config(config, [f"run.root={folder / recipe}"])
        run_dir = ref.run_dirs[recipe] = cfg.run_dir
        if recipe == "micro":
            tok = subprocess.run(_run_cmd("tokenizer", config, folder / recipe), cwd=code, env=ENV, capture_output=True)
            assert tok.returncode == 0, tok.stderr.decode()[-4000:]
        else:
            for stage in ("tokenizer", "pretrain", "sft"):
                shutil.copytree(ref.run_dirs["micro"] / stage, run_dir / stage)
        for stage in [s for s, r in CASES if r == recipe]:
            t0 = time.time()
            watch = Watch(
                _run_cmd(stage, config, folder / recipe),
                code,
                folder / f"{stage}-{recipe}.log",
                StageDir.of(run_dir, stage),
            )
            watch.finish()
            profile = ref.profiles[stage, recipe] = Profile.of(watch, _steps(cfg, stage))
            print(
                f"reference {stage} ({recipe}): {time.time() - t0:.1f}s, {profile}; checkpoints {profile.checkpoints}"
            )
    return ref


# ----------------------------------------------------------------------------- one attempt, killed


@dataclass(frozen=True)
class Plan:
    """When to kill an attempt: ``delay`` seconds after the checkpoint of step ``anchor`` is complete (None: after
    the stage body starts); for ``at-write``, when the first checkpoint write after that begins."""

    mode: str
    """``timed``, ``at-write`` or ``after-training`` (anchored on the last step's checkpoint)."""
    anchor: int | None
    delay: float = 0.0

    def __str__(self) -> str:
        at = "body start" if self.anchor is None else f"checkpoint {self.anchor}"
        return f"next write after {at}" if self.mode == "at-write" else f"{at} + {self.delay:.2f}s"


def _anchors(rng: random.Random, profile: Profile, n: int) -> list[int | None]:
    """Where ``n`` kills during training go, in order: the body start and the checkpoints before the last one,
    split into ``n`` runs of about equal length, one drawn from each (see :class:`Plan`)."""
    candidates: list[int | None] = [None, *profile.checkpoints[:-1]]
    bounds = [round(i * len(candidates) / n) for i in range(n + 1)]
    return [rng.choice(candidates[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]


def _plan(rng: random.Random, mode: str, anchor: int | None, profile: Profile, resumed: int | None) -> Plan:
    """The next kill for an attempt that resumes from checkpoint ``resumed``: ``anchor`` (from :func:`_anchors`;
    the body start instead when the attempt resumes past it), then a random delay of up to the time between that
    checkpoint and the next (from the reference's timings); or a random moment after training."""
    done = resumed or 0
    ahead = [s for s in profile.checkpoints if s > done]
    if mode == "after-training":
        if ahead:
            return Plan(mode, profile.steps, rng.uniform(0.0, 0.6) * profile.after)
        return Plan(mode, None, rng.uniform(0.0, profile.before + 0.6 * profile.after))
    if anchor is not None and anchor <= done:
        anchor = None
    if mode == "at-write":
        return Plan(mode, anchor)
    if anchor is None:
        return Plan(mode, None, rng.uniform(0.0, profile.before + ((ahead or [done])[0] - done) * profile.per_step))
    return Plan(mode, anchor, rng.uniform(0.0, (ahead[ahead.index(anchor) + 1] - anchor) * profile.per_step))


@dataclass
class Kill:
    """Where one SIGKILL landed."""

    plan: Plan
    after_s: float
    """Seconds after the stage body started (-1: the body had not started)."""
    resumed_from: int | None
    """The checkpoint step this attempt resumed from (None: from scratch)."""
    checkpoint: int | None
    """The newest complete checkpoint when the kill landed."""
    logged_step: int | None
    """The last step in metrics.jsonl (training had reached at least that step)."""
    half_written: list[tuple[str, int]]
    """Incomplete checkpoint folders left by the kill, with their steps: a write cut off (or the removal of an old
    checkpoint, when its marker went first)."""
    finished: bool = False
    """The manifest was written before the kill landed (nothing left to interrupt)."""

    def describe(self) -> str:
        where = "before the first checkpoint" if self.checkpoint is None else f"after checkpoint step {self.checkpoint}"
        if self.logged_step is not None:
            where += f", logged step {self.logged_step}"
        writing = [n for n, step in self.half_written if step > (self.checkpoint or 0)]
        removing = [n for n, step in self.half_written if step <= (self.checkpoint or 0)]
        if writing:
            where += f", during the write of {', '.join(writing)}"
        if removing:
            where += f", during the removal of {', '.join(removing)} (an old checkpoint)"
        if self.after_s < 0:
            where += ", during start-up"
        if self.finished:
            where += ", after the manifest"
        start = "scratch" if self.resumed_from is None else f"step {self.resumed_from}"
        return f"{self.plan.mode} kill ({self.plan}), {self.after_s:.1f}s into the body resumed from {start}: {where}"


def _last_logged_step(sd: StageDir) -> int | None:
    steps = [m["step"] for m in sd.read_metrics() if isinstance(m.get("step"), int)]
    return max(steps) if steps else None


def _write_began(sd: StageDir):
    """A predicate: an incomplete checkpoint appeared that was not left by an earlier kill (those are removed when
    the stage resumes; a new one with the same name may come after)."""
    leftovers = {c.path.name for c in sd.find_checkpoints() if not c.complete}

    def began() -> bool:
        incomplete = {c.path.name for c in sd.find_checkpoints() if not c.complete}
        leftovers.intersection_update(incomplete)
        return bool(incomplete - leftovers)

    return began


def _attempt(cmd: list[str], cwd: Path, log: Path, sd: StageDir, rng: random.Random, mode: str,
             anchor: int | None, profile: Profile) -> Kill | None:  # fmt: skip
    """Start ``cmd`` and kill it as :func:`_plan` says. Returns where the kill landed, or None when the command ended
    first (successfully)."""
    resumed = sd.latest_complete().step if sd.latest_complete() else None
    plan = _plan(rng, mode, anchor, profile, resumed)
    began = _write_began(sd)
    watch = Watch(cmd, cwd, log, sd)
    every = 0.003 if plan.mode == "after-training" else 0.01  # the time after training can be short
    if watch.wait_for(
        lambda: watch.body is not None and (plan.anchor is None or plan.anchor in watch.seen), 900, every
    ):
        t = watch.body if plan.anchor is None else watch.body + watch.seen[plan.anchor]
        if plan.mode == "at-write":
            watch.wait_for(began, 600, 0.002)
        else:
            watch.wait_for(lambda: time.time() - t >= plan.delay, plan.delay + 600, 0.005)
    if watch.proc.poll() is not None:
        assert watch.proc.returncode == 0, log.read_text()[-4000:]
        return None
    after = time.time() - watch.body if watch.body is not None else -1.0
    watch.kill()
    latest = sd.latest_complete()
    half = [(c.path.name, c.step) for c in sd.find_checkpoints() if not c.complete]
    return Kill(plan, after, resumed, latest.step if latest else None, _last_logged_step(sd), half,
                sd.manifest_path.exists())  # fmt: skip


# ----------------------------------------------------------------------------- the test


def _files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _differences(ref: Path, got: Path) -> list[str]:
    """What differs between two artifact folders: missing/extra files; for differing files their name, and for
    safetensors the tensors that differ with their largest absolute difference."""
    a, b = _files(ref), _files(got)
    out = [f"missing {n}" for n in sorted(set(a) - set(b))] + [f"extra {n}" for n in sorted(set(b) - set(a))]
    for name in sorted(set(a) & set(b)):
        if a[name].read_bytes() == b[name].read_bytes():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            ta, tb = load_file(a[name]), load_file(b[name])
            diff = {
                k: float((ta[k].double() - tb[k].double()).abs().max())
                for k in ta
                if k in tb and not ta[k].equal(tb[k])
            }
            if diff:
                worst = sorted(diff.items(), key=lambda kv: -kv[1])[:4]
                out.append(f"{name}: {len(diff)}/{len(ta)} tensors differ, the most: {dict(worst)}")
            else:
                out.append(
                    f"{name}: same tensor values; the keys ({sorted(set(ta) ^ set(tb))}), dtypes or metadata differ"
                )
        else:
            ra, rb = a[name].read_bytes(), b[name].read_bytes()
            at = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
            lo, hi = max(0, at - 80), at + 200
            out.append(f"{name} differs from byte {at}: ref {ra[lo:hi]!r}, got {rb[lo:hi]!r}")
    return out


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize(("stage", "recipe"), CASES, ids=[f"{s}-{r}" for s, r in CASES])
def test_sigkilled_stage_resumes_to_a_byte_identical_artifact(reference, stage, recipe, tmp_path):
    root, config = tmp_path / "runs", reference.configs[recipe]
    cfg = load_config(config, [f"run.root={root}"])
    for up in UPSTREAM[stage]:
        shutil.copytree(reference.run_dirs[recipe] / up, cfg.run_dir / up)
    fps = all_fingerprints(cfg)
    assert {up: StageDir.of(cfg.run_dir, up).state(fps[up]) for up in UPSTREAM[stage]} == dict.fromkeys(
        UPSTREAM[stage], "done"
    ), "copied upstream stages must stay done in the new run root"
    ref_sd, sd = StageDir.of(reference.run_dirs[recipe], stage), StageDir.of(cfg.run_dir, stage)
    assert sd.state(fps[stage]) == "missing" and ref_sd.manifest()["fingerprint"] == fps[stage]

    profile = reference.profiles[stage, recipe]
    rng = random.Random(f"sigkill {stage} {recipe}")
    modes = ["timed"] * KILLS
    modes[rng.randrange(1, KILLS - 1)] = "at-write"  # one kill (neither the first nor the last) at a checkpoint write
    modes[-1] = "after-training"  # the last one after the last step's checkpoint
    cmd, log = _run_cmd(stage, config, root), tmp_path / f"{stage}.log"
    kills: list[Kill] = []
    t0 = time.time()
    anchors = [*_anchors(rng, profile, KILLS - 1), profile.steps]
    for mode, anchor in zip(modes, anchors):
        kill = _attempt(cmd, reference.code, log, sd, rng, mode, anchor, profile)
        if kill is None:
            break
        kills.append(kill)
    last = sd.latest_complete()
    offset = log.stat().st_size
    Watch(cmd, reference.code, log, sd).finish()
    report = "\n".join(f"  {k.describe()}" for k in kills)
    report += f"\n  then run to the end from {f'checkpoint step {last.step}' if last else 'scratch'}"
    print(f"\n{stage} ({recipe}): {len(kills)} kills, {time.time() - t0:.0f}s in all (reference {profile}):\n{report}")

    assert sd.state(fps[stage]) == "done"
    problems = _differences(ref_sd.artifact, sd.artifact)
    assert not problems, (
        f"{stage} ({recipe}): the artifact differs from the uninterrupted run's:\n{report}\n" + "\n".join(problems)
    )
    # the kills interrupted real work: several came after a checkpoint, and a run resumed from one
    assert len(kills) >= KILLS - 1, f"{stage} ({recipe}): the stage finished before its kills:\n{report}"
    assert sum(k.checkpoint is not None and not k.finished for k in kills) >= 2, (
        f"{stage} ({recipe}): few kills after a checkpoint:\n{report}"
    )
    went_on = any(k.resumed_from is not None and (k.checkpoint or 0) > k.resumed_from for k in kills)
    assert went_on or f"{stage}: resuming ->" in log.read_text()[offset:], (
        f"{stage} ({recipe}): no resume from a checkpoint:\n{report}"
    )
