"""Preference pairs on the SFT model's own samples, ranked by the task checker (``reward.on_policy_samples``).

InstructGPT's labellers ranked samples of the model being aligned; here the task checker labels them. The pairs
are drawn once by the main process into ``<stage>/on_policy_pairs.jsonl`` (:func:`draw_on_policy_pairs`; other
processes wait for the file), so every process and every resume trains on the same pairs. Only training records
are sampled, never held-out prompts.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.data.preferences import PreferenceGroup
from pipeline.data.task_checks import has_checker, score_answer
from pipeline.data.tasks import write_jsonl
from pipeline.lm import generate_responses
from pipeline.runs import StageError

__all__ = ["on_policy_groups", "draw_on_policy_pairs", "ON_POLICY_FILE"]

log = logging.getLogger(__name__)

ON_POLICY_FILE = "on_policy_pairs.jsonl"


def on_policy_groups(
    policy: Any,
    tokenizer: Any,
    groups: list[PreferenceGroup],
    k: int,
    pairs_per_prompt: int,
    max_new_tokens: int,
    batch_size: int = 32,
    seed: int = 0,
) -> list[PreferenceGroup]:
    """Preference pairs on the policy's own samples, ranked by the task checker (InstructGPT's labellers
    ranked model samples; here the checker labels them).

    For each group of ``groups`` whose prompt is a single message with a checker (``task``/``answer`` in its
    meta; a prompt that several groups share is sampled for each), ``k`` responses are sampled (temperature 1,
    ``seed``). Every distinct wrong sample is paired with a right response (the record's answer, or a right sample);
    at most ``pairs_per_prompt`` pairs per prompt, picked with a seeded shuffle. Each pair is a K=2 group with the checker's scores (so ``reward.margin``
    applies to it as to the generated data) and the prompt's meta.

    Returns:
        The new groups, in prompt order (empty when no prompt has a checker).
    """
    todo = [(g.prompt, g.meta) for g in groups if isinstance(g.prompt, str) and has_checker(g.meta)]
    if not todo or k < 1 or pairs_per_prompt < 1:
        return []
    many = [p for p, _ in todo for _ in range(k)]
    samples = generate_responses(
        policy, tokenizer, many, max_new_tokens, batch_size=batch_size, do_sample=True, seed=seed
    )
    rng = random.Random(seed)
    out = []
    for i, (prompt, meta) in enumerate(todo):
        scored = {s: score_answer(meta, s) for s in [str(meta["answer"]), *samples[i * k : (i + 1) * k]]}
        right = [s for s, v in scored.items() if v == 1.0]
        wrong = [s for s, v in scored.items() if v < 1.0]
        pairs = [(r, w) for r in right for w in wrong]
        rng.shuffle(pairs)
        for r, w in pairs[:pairs_per_prompt]:
            out.append(PreferenceGroup(prompt, [r, w], [0, 1], scores=[scored[r], scored[w]],
                                       location=f"on-policy sample of {meta.get('id', prompt)!r}", meta=dict(meta)))  # fmt: skip
    return out


def draw_on_policy_pairs(
    path: Path,
    is_main: bool,
    sample: Callable[[], list[PreferenceGroup]],
    timeout_s: float = 3600.0,
) -> list[PreferenceGroup]:
    """The on-policy pairs in ``path``: drawn with ``sample()`` and written there by the main process when the file
    does not exist yet (a resume reuses it); other processes wait for it.

    Raises:
        StageError: the file did not appear within ``timeout_s`` on a process that waits for it.
    """
    if not path.is_file() and is_main:
        new = sample()
        write_jsonl(
            ({"prompt": g.prompt, "responses": g.responses, "scores": g.scores, "meta": g.meta} for g in new), path
        )
        log.info("reward: %d on-policy pairs -> %s", len(new), path)
    deadline = time.monotonic() + timeout_s
    while not path.is_file():  # another process is drawing them
        if time.monotonic() > deadline:
            raise StageError(
                f"reward: {path} did not appear within {timeout_s:.0f} s (the main process draws the samples)"
            )
        time.sleep(0.5)
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        r = json.loads(line)
        out.append(PreferenceGroup(r["prompt"], r["responses"], [0, 1], scores=r["scores"],
                                   location=f"{path}:{i}", meta=r["meta"]))  # fmt: skip
    if not out:
        log.warning("reward: reward.on_policy_samples gave no pairs (no training prompt has a task checker, "
                    "or every sample was right)")  # fmt: skip
    return out
