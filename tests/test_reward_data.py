"""Preference records: normalisation of every accepted format, K-wise expansion and weights, validation."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from pipeline.config import DatasetSpec, TasksConfig
from pipeline.data.preferences import (
    PreferenceGroup,
    expand_comparisons,
    load_preferences,
    normalise_preference,
    parse_hh_text,
    split_heldout,
    to_pairwise,
)
from pipeline.data.records import BadRecord, Record


def _norm(data: dict, where: str = "prefs.jsonl:7") -> PreferenceGroup:
    return normalise_preference(Record(where, data))


# ----------------------------------------------------------------------------- K-wise expansion


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7])
def test_kwise_expansion_gives_exactly_the_ck2_ordered_pairs_weighted_once_per_prompt(k):
    ranking = [(3 * i + 1) % k for i in range(k)] if math.gcd(3, k) == 1 else list(reversed(range(k)))
    g = PreferenceGroup("q", [f"r{i}" for i in range(k)], ranking)
    comps = expand_comparisons(g)
    # exactly C(K,2) comparisons, each an ordered (better, worse) pair of the ranking, none repeated or reversed
    assert len(comps) == math.comb(k, 2)
    expected = {(ranking[i], ranking[j]) for i, j in itertools.combinations(range(k), 2)}
    assert {(c.winner, c.loser) for c in comps} == expected
    # weights: each comparison 1/C(K,2) (K=4: 1/6), so a prompt's comparisons sum to 1 whatever K is
    assert all(c.weight == pytest.approx(1 / math.comb(k, 2)) for c in comps)
    assert sum(c.weight for c in comps) == pytest.approx(1.0)


def test_k4_weights_and_order_literal():
    g = PreferenceGroup("q", ["a", "b", "c", "d"], [2, 0, 3, 1])
    assert [(c.winner, c.loser) for c in expand_comparisons(g)] == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]
    assert [c.weight for c in expand_comparisons(g)] == pytest.approx([1 / 6] * 6)  # 1/C(4,2)


def test_margins_come_from_scores_or_the_pairwise_margin():
    g = PreferenceGroup("q", ["a", "b", "c"], [1, 2, 0], scores=[0.1, 0.9, 0.5])
    assert [round(c.margin, 6) for c in expand_comparisons(g)] == [0.4, 0.8, 0.4]
    p = PreferenceGroup("q", ["a", "b"], [0, 1], margin=2.5)
    assert [c.margin for c in expand_comparisons(p)] == [2.5]
    assert [c.margin for c in expand_comparisons(PreferenceGroup("q", ["a", "b"], [0, 1]))] == [0.0]


def test_to_pairwise_expands_every_comparison_as_an_independent_pair():
    groups = [PreferenceGroup("q1", ["a", "b", "c", "d"], [3, 2, 1, 0]), PreferenceGroup("q2", ["x", "y"], [1, 0])]
    pairs = to_pairwise(groups)
    assert len(pairs) == 6 + 1
    assert pairs[0] == {"prompt": "q1", "chosen": "d", "rejected": "c", "margin": 0.0}
    assert pairs[-1] == {"prompt": "q2", "chosen": "y", "rejected": "x", "margin": 0.0}


# ----------------------------------------------------------------------------- accepted formats


def test_pairwise_text_with_margin_and_metadata():
    g = _norm({"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": "1.5", "id": "x1"})
    assert (g.prompt, g.responses, g.ranking, g.margin, g.meta) == ("2+2?", ["4", "5"], [0, 1], 1.5, {"id": "x1"})
    assert g.location == "prefs.jsonl:7"


def test_pairwise_conversational_explicit_prompt():
    g = _norm(
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
        }
    )
    assert g.prompt == "hi"  # a single user turn becomes the plain user message
    assert g.responses == ["hello", "go away"]
    sys_prompt = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    g2 = _norm({"prompt": sys_prompt, "chosen": "hello", "rejected": "no"})
    assert g2.prompt == sys_prompt


def test_pairwise_whole_conversations_implicit_prompt():
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    g = _norm(
        {
            "chosen": turns + [{"role": "assistant", "content": "good"}],
            "rejected": turns + [{"role": "assistant", "content": "bad"}],
        }
    )
    assert g.prompt == turns and g.responses == ["good", "bad"]


def test_anthropic_hh_text():
    base = "\n\nHuman: What is the capital of France?\n\nAssistant: Why?\n\nHuman: Curious."
    g = _norm({"chosen": base + "\n\nAssistant: Paris.", "rejected": base + "\n\nAssistant: No idea."})
    assert g.prompt == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Why?"},
        {"role": "user", "content": "Curious."},
    ]
    assert g.responses == ["Paris.", "No idea."]
    assert parse_hh_text("no markers here") is None


def test_kwise_ranking_and_scores_only():
    g = _norm({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "task": "add", "answer": "3"})
    assert g.ranking == [2, 0, 1] and g.meta == {"task": "add", "answer": "3"}
    s = _norm({"prompt": "q", "responses": ["a", "b", "c"], "scores": [0.2, 0.9, 0.5]})
    assert s.ranking == [1, 2, 0] and s.scores == [0.2, 0.9, 0.5]


# ----------------------------------------------------------------------------- rejected records


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, "field 'ranking' repeats index 0"),
        ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0]}, "field 'ranking' misses index 1"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 2]}, "field 'ranking' has index 2 out of range"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": "01"}, "field 'ranking' must be a list"),
        ({"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 0.5, 1]}, "field 'scores' ties responses"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1], "scores": [0, 1]}, "disagree"),
        ({"prompt": "q", "responses": ["a", "b"], "scores": [1]}, "field 'scores' must be a list of 2 numbers"),
        ({"prompt": "q", "responses": ["a", "a"], "ranking": [0, 1]}, "identical responses 0 and 1"),
        ({"prompt": "q", "responses": ["a"], "ranking": [0]}, "field 'responses' must be a list of at least 2"),
        ({"prompt": "q", "responses": ["a", "b"]}, "field 'ranking' (or 'scores') is missing"),
        ({"responses": ["a", "b"], "ranking": [0, 1]}, "field 'prompt' is missing"),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
        ({"prompt": "q", "chosen": "x", "rejected": "y", "margin": "big"}, "field 'margin' must be a number"),
        ({"prompt": "", "chosen": "x", "rejected": "y"}, "is plain text but there is no 'prompt'"),
        ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "x", "rejected": "y"}, "'prompt[0].role'"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "differ before"),
        ({"question": "q", "answer": "a"}, "not a preference record"),
    ],
)
def test_bad_records_name_location_and_field(record, message):
    with pytest.raises(BadRecord) as e:
        _norm(record, "data/prefs.jsonl:12")
    assert str(e.value).startswith("data/prefs.jsonl:12: ")
    assert message in str(e.value)


def _write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_load_file_error_and_skip_modes_with_counts(tmp_path):
    good = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(20)]
    lines = good[:5] + ["{not json"] + good[5:12] + [{"prompt": "q", "responses": ["a", "b"], "ranking": [1, 1]}]
    path = _write_jsonl(tmp_path / "prefs.jsonl", lines + good[12:])
    spec = DatasetSpec(source=path, eval_fraction=0.25)
    with pytest.raises(BadRecord, match=r"prefs\.jsonl:6: not valid JSON"):
        load_preferences(spec, TasksConfig(), seed=0)
    data = load_preferences(DatasetSpec(source=path, eval_fraction=0.25, on_bad_record="skip"), TasksConfig(), 0)
    assert data.skipped_by_split == {"train": 2}
    assert "prefs.jsonl:14: field 'ranking' repeats index 1" in data.skipped_examples[1]
    assert len(data.train) + len(data.held_out) == 20 and len(data.held_out) == 5
    # the held-out split is by prompt: no prompt is on both sides
    assert not {g.prompt for g in data.train} & {g.prompt for g in data.held_out}


def test_eval_source_and_max_records(tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(9)])
    held = _write_jsonl(tmp_path / "e.jsonl", [{"prompt": "e", "responses": ["a", "b", "c"], "ranking": [1, 2, 0]}])
    data = load_preferences(DatasetSpec(source=train, eval_source=held, max_records=4), TasksConfig(), 0)
    assert len(data.train) == 4 and [g.ranking for g in data.held_out] == [[1, 2, 0]]


def test_split_heldout_is_deterministic_and_by_prompt():
    groups = [PreferenceGroup(f"q{i % 10}", ["a", "b"], [0, 1]) for i in range(30)]
    tr, ev = split_heldout(groups, 0.2, seed=3)
    assert (tr, ev) == split_heldout(groups, 0.2, seed=3)
    assert len({g.prompt for g in ev}) == 2 and len(ev) == 6
    assert not {g.prompt for g in tr} & {g.prompt for g in ev}


def test_default_generated_sets_normalise_without_errors():
    cfg = TasksConfig(n_sft_train=10, n_sft_eval=4, n_reward_train=40, n_reward_eval=12, n_ppo_train=4, n_ppo_eval=4)
    data = load_preferences(DatasetSpec(), cfg, seed=0)
    assert (len(data.train), len(data.held_out), data.skipped_by_split) == (40, 12, {})
    assert all(len(g.responses) == cfg.responses_per_prompt for g in data.train + data.held_out)
    assert all(g.meta.get("task") and "answer" in g.meta for g in data.held_out)


def test_invalid_utf8_line_is_a_bad_record_with_file_and_line(tmp_path):
    good = [json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}).encode() for i in range(8)]
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b"\n".join([good[0], b'{"prompt": "\xc3\x28", "chosen": "a", "rejected": "b"}', *good[1:]]))
    with pytest.raises(BadRecord, match=r"prefs\.jsonl:2: not valid UTF-8 \(byte 0xc3 at column 13\)"):
        load_preferences(DatasetSpec(source=str(path), eval_fraction=0.25), TasksConfig(), seed=0)
    data = load_preferences(DatasetSpec(source=str(path), eval_fraction=0.25, on_bad_record="skip"), TasksConfig(), 0)
    assert data.skipped_by_split == {"train": 1} and len(data.train) + len(data.held_out) == 8


def test_groups_far_over_the_context_are_dropped_before_tokenising():
    from test_sft_data import _CharTokenizer

    from pipeline.reward.data import dpo_rows, encode_groups

    groups = [PreferenceGroup("p", ["a", "b" * 1_000_000], [0, 1]), PreferenceGroup("p2", ["a", "b"], [1, 0])]
    kept, dropped = encode_groups(_CharTokenizer(), groups, max_length=64)
    assert dropped == 1 and [g.prompt for g, _ in kept] == ["p2"]
    rows, kept_groups = dpo_rows(_CharTokenizer(), [PreferenceGroup("b" * 1_000_000, ["a", "b"], [0, 1])], 64)
    assert rows == [] and kept_groups == []
