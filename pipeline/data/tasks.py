"""Generated instruction tasks whose answers a program can check: the embedded default data.

When a stage's dataset ``source`` is ``default`` it trains on these sets, generated in memory and
deterministically from ``data.tasks`` (:class:`~pipeline.config.TasksConfig`). Each record carries its
ground truth (``task``, ``answer``), so :func:`check_answer` and :func:`score_answer` can verify a model
by something other than the reward model.

Task families (``data.tasks.kinds``), each with a few phrasings:

=========  ======================================  ===========
kind       prompt                                  answer
=========  ======================================  ===========
add        What is 23 + 45?                        68
spell      Spell the word king.                    k i n g
reverse    Reverse k i n g.                        g n i k
sort       Sort the letters k i n g.               g i k n
count      How many letters are in k i n g?        4
=========  ======================================  ===========

Words are common words of Shakespeare's plays (``words.txt`` beside this module, at most
``max_word_len`` letters); numbers are 0 to ``max_operand``. A share ``holdout_fraction`` of the words and of the unordered number pairs is held out:
no training prompt (SFT, reward or PPO) uses them, so held-out accuracy measures generalisation.

Sets (:class:`TaskSets`), sizes from the config, kinds balanced:

- ``sft_train`` / ``sft_eval``: chat records (``messages``) on training / held-out items.
- ``reward_train`` / ``reward_eval``: K-wise ranked responses (``responses``, ``ranking`` best first,
  ``scores``): the correct answer, near misses (off-by-one digits, a letter swapped, dropped or doubled)
  and malformed answers (empty, wrong format, rambling, repeated, an answer to another question; left out
  with ``malformed_candidates=False``), ranked by :func:`score_answer`; every score in a record is
  distinct. :func:`to_pairs` gives the C(K, 2) pairs.
- ``ppo_train`` / ``ppo_eval``: prompts. ``ppo_eval`` holds the same prompts as ``sft_eval`` (so SFT and
  PPO report checker accuracy on one held-out set); ``ppo_train`` shares no prompt with ``sft_train`` or
  ``sft_eval`` (prompts repeat only when a requested size exceeds the pool, with a warning).

Every id contains :data:`GENERATOR_VERSION`, bumped on any change in generated output.

The checker (``task_checks``) and the ranked candidates (``task_candidates``) live in their own modules;
their public functions are re-exported here, the one place to import the generated tasks from.

Usage::

    sets = generate_tasks(TasksConfig())
    sets.sft_train[0]["messages"]      # [{"role": "user", ...}, {"role": "assistant", ...}]
    check_answer(sets.sft_eval[0], "k i n g")
    export_default_datasets(TasksConfig(), "data/tasks")   # the six sets as .jsonl, to inspect or replace
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.config import TasksConfig
from pipeline.data.task_candidates import ranked_candidates, to_pairs
from pipeline.data.task_checks import SAY_FORMS, answer_format, check_answer, response_class, score_answer, spaced

__all__ = [
    "GENERATOR_VERSION",
    "KINDS",
    "TaskSets",
    "generate_tasks",
    "check_answer",
    "score_answer",
    "response_class",
    "answer_format",
    "to_pairs",
    "write_jsonl",
    "export_default_datasets",
    "load_words",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = "3"
"""Part of every record id; bump on any change in the generated output."""

_STREAM_VERSION = "2"
"""Seeds the random streams (the held-out split, demonstrations, candidates) and the sets' order. It stays when a
version changes the generated records, so that the held-out split stays as it was (v3 dropped the ``say`` task's
bare-word form; its held-out words are v2's)."""


# ----------------------------------------------------------------------------- families


_SAY_TEMPLATE_FORMS = [(t, form) for ts, form in SAY_FORMS for t in ts]


@dataclass(frozen=True)
class _Family:
    templates: tuple[str, ...]
    """Prompt phrasings; fields {w} (word) or {a}, {b} (numbers)."""
    items: str
    """'words' or 'pairs'."""
    answer: Callable[[tuple[Any, ...], int], str]
    """The answer to an item asked with template number t."""
    lazy: Callable[[tuple[Any, ...]], str] | None = None
    """The answer a careless demonstrator gives whatever the template asks (``say``: the bare word); None:
    demonstrations always follow the template."""


FAMILIES: dict[str, _Family] = {
    # Numbers are single digits in a Shakespeare BPE, so the model sees every digit of the operands.
    "add": _Family(
        ("What is {a} + {b}?", "Add {a} and {b}.", "{a} + {b} ="), "pairs", lambda it, t: str(it[0] + it[1])
    ),
    # The word is one to three BPE pieces: spelling it needs what each piece is made of.
    "spell": _Family(
        ("Spell the word {w}.", "Spell {w} letter by letter.", "How do you spell {w}?"),
        "words",
        lambda it, t: spaced(it[0]),
    ),
    # The letters are given spaced (one token each), so reversing and counting generalise to unseen words.
    "reverse": _Family(
        ("Reverse {s}.", "Reverse the letters {s}.", "Write {s} backwards."),
        "words",
        lambda it, t: spaced(reversed(it[0])),
    ),
    # Not in the default kinds. A wrong order shows in one adjacent pair, so generated near misses are easy
    # to judge, but the SFT model's own errors (wrong letters, in order) are not: data_cards/generated-tasks-sft.md.
    "sort": _Family(
        ("Sort the letters {s}.", "Put {s} in alphabetical order.", "Sort {s} from a to z."),
        "words",
        lambda it, t: spaced(sorted(it[0])),
    ),
    "count": _Family(
        ("How many letters are in {s}?", "Count the letters in {s}.", "How many letters does {s} have?"),
        "words",
        lambda it, t: str(len(it[0])),
    ),
    # The word in the form the prompt asks for: copying the word is easy, the form is what demonstrations
    # get wrong (data.tasks.sft_follow_rate), and a judge sees the form at a glance.
    "say": _Family(
        tuple(t for t, _ in _SAY_TEMPLATE_FORMS),
        "words",
        lambda it, t: _SAY_TEMPLATE_FORMS[t][1].format(w=it[0]),
        lazy=lambda it: it[0],
    ),
}
KINDS: tuple[str, ...] = tuple(FAMILIES)


@lru_cache(maxsize=1)
def load_words() -> tuple[str, ...]:
    """The embedded word list (``words.txt``): sorted, lowercase, alphabetic, 3 to 8 letters.

    Raises:
        ValueError: a line of ``words.txt`` that is not such a word (names the line).
    """
    text = resources.files("pipeline.data").joinpath("words.txt").read_text(encoding="utf-8")
    words = []
    for i, line in enumerate(text.splitlines(), 1):
        w = line.strip()
        if not w or w.startswith("#"):
            continue
        if not (w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 8):
            raise ValueError(f"pipeline/data/words.txt:{i}: {w!r} is not a lowercase word of 3-8 letters")
        words.append(w)
    return tuple(sorted(set(words)))


# ----------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Prompt:
    kind: str
    item: tuple[Any, ...]
    """(word,) or (a, b) in prompt order."""
    template: int
    cycle: int = 0
    """How many times the pool was wrapped to reach this prompt (0: first use)."""

    @property
    def text(self) -> str:
        fam = FAMILIES[self.kind]
        fields_ = (
            {"w": self.item[0], "s": spaced(self.item[0])}
            if fam.items == "words"
            else {"a": self.item[0], "b": self.item[1]}
        )
        return fam.templates[self.template].format(**fields_)

    @property
    def answer(self) -> str:
        return FAMILIES[self.kind].answer(self.item, self.template)

    @property
    def lazy_answer(self) -> str | None:
        lazy = FAMILIES[self.kind].lazy
        return None if lazy is None else lazy(self.item)

    @property
    def id(self) -> str:
        return self.versioned_id(GENERATOR_VERSION)

    def versioned_id(self, version: str) -> str:
        key = "+".join(map(str, self.item))
        return f"tasks-v{version}-{self.kind}-{key}-p{self.template}" + (f"-c{self.cycle}" if self.cycle else "")


@dataclass
class TaskSets:
    """The six generated sets (lists of JSON-ready records, see the module docstring)."""

    sft_train: list[dict[str, Any]]
    sft_eval: list[dict[str, Any]]
    reward_train: list[dict[str, Any]]
    reward_eval: list[dict[str, Any]]
    ppo_train: list[dict[str, Any]]
    ppo_eval: list[dict[str, Any]]

    def as_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _rng(cfg: TasksConfig, purpose: str) -> random.Random:
    # str seeds hash with SHA-512 inside `random`: stable across processes and PYTHONHASHSEED.
    return random.Random(f"tasks-v{_STREAM_VERSION}:{cfg.seed}:{purpose}")


def _split_items(cfg: TasksConfig) -> dict[str, tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """(train items, held-out items of ``cfg.eval_split``) for words and for unordered number pairs.

    The held-out items are split once more, by ``dev_fraction``, into a dev split (for choosing settings) and a
    test split (for the reported numbers); the two never share an item. With a single held-out item both
    splits are that item.
    """
    words = [(w,) for w in load_words() if len(w) <= cfg.max_word_len]
    pairs = [(a, b) for a in range(cfg.max_operand + 1) for b in range(a, cfg.max_operand + 1)]
    out = {}
    for name, items in (("words", words), ("pairs", pairs)):
        _rng(cfg, f"split-{name}").shuffle(items)
        n_held = min(len(items) - 1, max(1, round(len(items) * cfg.holdout_fraction)))  # both sides non-empty
        held = items[:n_held]
        n_dev = min(len(held) - 1, max(1, round(len(held) * cfg.dev_fraction)))
        dev, test = (held, held) if n_dev < 1 else (held[:n_dev], held[n_dev:])
        out[name] = (items[n_held:], dev if cfg.eval_split == "dev" else test)
    return out


def _variants(kind: str, item: tuple[Any, ...]) -> list[_Prompt]:
    fam = FAMILIES[kind]
    orders = [item] if fam.items == "words" or item[0] == item[1] else [item, item[::-1]]
    return [_Prompt(kind, o, t) for o in orders for t in range(len(fam.templates))]


def _pool(kind: str, items: list[tuple[Any, ...]], rng: random.Random) -> list[_Prompt]:
    """Every prompt of ``items``, in rounds: each item's first variant comes before any item's second,
    so a prefix of the pool covers as many distinct items as it can."""
    per_item = [_variants(kind, it) for it in items]
    for v in per_item:
        rng.shuffle(v)
    pool: list[_Prompt] = []
    for r in range(max(len(v) for v in per_item)):
        order = list(range(len(per_item)))
        rng.shuffle(order)
        pool += [per_item[i][r] for i in order if r < len(per_item[i])]
    return pool


def _per_kind(n: int, kinds: tuple[str, ...]) -> dict[str, int]:
    return {k: n // len(kinds) + (i < n % len(kinds)) for i, k in enumerate(kinds)}


def _take(pool: list[_Prompt], start: int, n: int, what: str) -> list[_Prompt]:
    """``pool[start:start + n]``, wrapping around (repeated prompts, a warning) past its end."""
    if start + n > len(pool):
        left = max(0, len(pool) - start)
        log.warning("%s: %d records requested, %d unused prompts left in the pool; prompts repeat", what, n, left)
    return [
        _Prompt(p.kind, p.item, p.template, i // len(pool)) if i >= len(pool) else p
        for i in range(start, start + n)
        for p in (pool[i % len(pool)],)
    ]


def _ordered(prompts: list[_Prompt], cfg: TasksConfig, group: str) -> list[_Prompt]:
    # A hash order, not a shuffle: sets of one group (sft_eval, ppo_eval) list shared prompts in one order.
    def key(p: _Prompt) -> str:
        return hashlib.sha256(f"{cfg.seed}:{group}:{p.versioned_id(_STREAM_VERSION)}".encode()).hexdigest()

    return sorted(prompts, key=key)


def _check_kinds(cfg: TasksConfig) -> None:
    unknown = [k for k in cfg.kinds if k not in FAMILIES]
    if unknown:
        raise ValueError(f"data.tasks.kinds: unknown task kind(s) {unknown}; valid kinds: {', '.join(KINDS)}")


def _allocate(cfg: TasksConfig) -> dict[str, list[_Prompt]]:
    """Split each kind's prompt pools into the six sets (prompts only)."""
    _check_kinds(cfg)
    items = _split_items(cfg)
    sets: dict[str, list[_Prompt]] = {
        k: [] for k in ("sft_train", "sft_eval", "reward_train", "reward_eval", "ppo_train", "ppo_eval")
    }
    sizes = {name: _per_kind(getattr(cfg, f"n_{name}"), cfg.kinds) for name in sets}
    for kind in cfg.kinds:
        train_items, held_items = items[FAMILIES[kind].items]
        train = _pool(kind, train_items, _rng(cfg, f"pool-train-{kind}"))
        held = _pool(kind, held_items, _rng(cfg, f"pool-held-{kind}"))
        s = {name: sz[kind] for name, sz in sizes.items()}
        for name in ("sft_eval", "ppo_eval"):
            if s[name] > len(held):
                raise ValueError(
                    f"data.tasks.n_{name}: {kind} has only {len(held)} held-out prompts for {s[name]} records; "
                    "lower it or raise data.tasks.holdout_fraction"
                )
        sets["sft_eval"] += held[: s["sft_eval"]]
        sets["ppo_eval"] += held[: s["ppo_eval"]]  # the same prompts as sft_eval
        sets["reward_eval"] += _take(held, s["sft_eval"], s["reward_eval"], f"reward_eval/{kind}")
        sets["sft_train"] += _take(train, 0, s["sft_train"], f"sft_train/{kind}")
        sets["ppo_train"] += _take(train, s["sft_train"], s["ppo_train"], f"ppo_train/{kind}")
        sets["reward_train"] += _take(train, s["sft_train"] + s["ppo_train"], s["reward_train"], f"reward_train/{kind}")
    return {name: _ordered(ps, cfg, "eval" if name in ("sft_eval", "ppo_eval") else name) for name, ps in sets.items()}


def _sft_record(p: _Prompt, demo: str | None = None) -> dict[str, Any]:
    """A chat record whose assistant turn is ``demo`` (default: the answer); ``answer`` is always the answer."""
    messages = [
        {"role": "user", "content": p.text},
        {"role": "assistant", "content": p.answer if demo is None else demo},
    ]
    return {"messages": messages, "task": p.kind, "answer": p.answer, "id": p.id}


def _demo(p: _Prompt, cfg: TasksConfig, rng: random.Random) -> str:
    """A training demonstration: the answer with probability ``sft_follow_rate``, else the family's lazy answer
    (one draw per prompt whatever its family, so the stream does not depend on which families are lazy)."""
    follows = rng.random() < cfg.sft_follow_rate
    lazy = p.lazy_answer
    return p.answer if follows or lazy is None else lazy


def _ppo_record(p: _Prompt) -> dict[str, Any]:
    return {"prompt": p.text, "task": p.kind, "answer": p.answer, "id": p.id}


def _reward_record(p: _Prompt, cfg: TasksConfig, rng: random.Random) -> dict[str, Any]:
    rec = {"prompt": p.text, "task": p.kind, "answer": p.answer, "id": p.id}
    k = cfg.responses_per_prompt
    responses, scores = ranked_candidates(rec, k, rng, load_words(), cfg.malformed_candidates)
    ranking = sorted(range(k), key=lambda i: (-scores[i], i))
    return {"prompt": p.text, "responses": responses, "ranking": ranking, "scores": scores, **rec}


def generate_tasks(cfg: TasksConfig) -> TaskSets:
    """Generate the six default sets, deterministically from ``cfg`` (same config, same records).

    Raises:
        ValueError: an unknown kind in ``data.tasks.kinds``, or more held-out records requested than
            held-out prompts exist (the message names the config key).
    """
    prompts = _allocate(cfg)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, ps in prompts.items():
        if name == "sft_train":
            rng = _rng(cfg, "demos")
            out[name] = [_sft_record(p, _demo(p, cfg, rng)) for p in ps]
        elif name.startswith("sft"):
            out[name] = [_sft_record(p) for p in ps]
        elif name.startswith("ppo"):
            out[name] = [_ppo_record(p) for p in ps]
        else:
            rng = _rng(cfg, f"candidates-{name}")
            out[name] = [_reward_record(p, cfg, rng) for p in ps]
    log.info("generated tasks v%s: %s", GENERATOR_VERSION, {k: len(v) for k, v in out.items()})
    return TaskSets(**out)


# ----------------------------------------------------------------------------- files


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write records as JSON lines, atomically (a temporary file renamed into place).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def export_default_datasets(cfg: TasksConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write the six generated sets as ``<out_dir>/<set>.jsonl`` (e.g. ``sft_train.jsonl``).

    The files are ordinary datasets: point a stage's ``dataset.source`` at one to train on an edited copy.

    Returns:
        Set name -> path written.
    """
    sets = generate_tasks(cfg)
    return {name: write_jsonl(recs, Path(out_dir) / f"{name}.jsonl") for name, recs in sets.as_dict().items()}
