"""The generated tasks: determinism, sizes, held-out disjointness, checkers, ranked responses, files."""

from __future__ import annotations

import dataclasses
import doctest
import json
import logging
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, TasksConfig, load_config
from pipeline.data import tasks
from pipeline.data.records import read_records
from pipeline.data.tasks import (
    GENERATOR_VERSION,
    KINDS,
    answer_format,
    check_answer,
    export_default_datasets,
    generate_tasks,
    load_words,
    response_class,
    score_answer,
    to_pairs,
)

SMALL = TasksConfig(n_sft_train=200, n_sft_eval=40, n_reward_train=60, n_reward_eval=20, n_ppo_train=80, n_ppo_eval=40)


@pytest.fixture(scope="module")
def default_sets():
    return generate_tasks(TasksConfig())


def _prompt(rec: dict) -> str:
    return rec["messages"][0]["content"] if "messages" in rec else rec["prompt"]


def _item(rec: dict) -> str:
    """The word or number pair behind a record: ``tasks-v1-add-23+45-p0`` -> ``add:23+45`` -> ``23+45``."""
    kind = rec["task"]
    key = rec["id"].split(f"-{kind}-", 1)[1].rsplit("-p", 1)[0]
    return "+".join(sorted(key.split("+"), key=int)) if tasks.FAMILIES[kind].items == "pairs" else key


def _is_near_miss(score: float) -> bool:
    return 0.5 <= score < 0.9


# ----------------------------------------------------------------------------- generation


def test_same_seed_same_sets_and_other_seed_other_sets():
    a, b = generate_tasks(SMALL), generate_tasks(SMALL)
    assert json.dumps(a.as_dict()) == json.dumps(b.as_dict())
    c = generate_tasks(dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    for name in a.as_dict():
        assert [r["id"] for r in a.as_dict()[name]] != [r["id"] for r in c.as_dict()[name]], name


def test_sizes_kinds_balanced_and_ids_unique(default_sets):
    cfg = TasksConfig()
    for name, recs in default_sets.as_dict().items():
        assert len(recs) == getattr(cfg, f"n_{name}"), name
        per_kind = {k: sum(r["task"] == k for r in recs) for k in cfg.kinds}
        assert max(per_kind.values()) - min(per_kind.values()) <= 1, (name, per_kind)
        ids = [r["id"] for r in recs]
        assert len(set(ids)) == len(ids), name
        assert all(i.startswith(f"tasks-v{GENERATOR_VERSION}-") for i in ids)
        assert len({_prompt(r) for r in recs}) == len(recs), f"{name}: a prompt repeats"


def test_record_schemas(default_sets):
    sft = default_sets.sft_train[0]
    assert set(sft) == {"messages", "task", "answer", "id"}
    assert [m["role"] for m in sft["messages"]] == ["user", "assistant"]
    assert sft["messages"][1]["content"] == sft["answer"]
    assert set(default_sets.ppo_train[0]) == {"prompt", "task", "answer", "id"}
    assert set(default_sets.reward_train[0]) == {"prompt", "responses", "ranking", "scores", "task", "answer", "id"}


def test_held_out_sets_are_disjoint_from_training(default_sets):
    s = default_sets
    train = s.sft_train + s.reward_train + s.ppo_train
    held = s.sft_eval + s.reward_eval + s.ppo_eval
    # no held-out word or number pair appears in any training prompt of any kind
    train_items = {(tasks.FAMILIES[r["task"]].items, _item(r)) for r in train}
    assert not {(tasks.FAMILIES[r["task"]].items, _item(r)) for r in held} & train_items
    assert not {_prompt(r) for r in held} & {_prompt(r) for r in train}
    # PPO evaluates on exactly SFT's held-out prompts, in the same order
    assert [r["prompt"] for r in s.ppo_eval] == [_prompt(r) for r in s.sft_eval]
    assert [r["answer"] for r in s.ppo_eval] == [r["answer"] for r in s.sft_eval]
    # PPO trains on prompts SFT never saw, and the reward model's held-out prompts are not SFT's held-out ones
    assert not {r["prompt"] for r in s.ppo_train} & {_prompt(r) for r in s.sft_train + s.reward_train}
    assert not {r["prompt"] for r in s.reward_eval} & {_prompt(r) for r in s.sft_eval}


def test_ppo_eval_smaller_than_sft_eval_is_a_subset():
    s = generate_tasks(dataclasses.replace(SMALL, n_ppo_eval=20))
    assert {r["prompt"] for r in s.ppo_eval} < {_prompt(r) for r in s.sft_eval}


def test_every_sft_answer_passes_its_checker(default_sets):
    for rec in default_sets.sft_train + default_sets.sft_eval:
        assert check_answer(rec, rec["messages"][1]["content"]), rec
        assert score_answer(rec, rec["answer"]) == 1.0
        assert answer_format(rec["answer"]) in ("number", "letters") or rec["task"] == "say"


@pytest.mark.parametrize("kind", KINDS)
def test_answers_are_right(kind):
    s = generate_tasks(dataclasses.replace(SMALL, kinds=(kind,)))
    for rec in s.sft_train[:50]:
        q = rec["messages"][0]["content"]
        fam = tasks.FAMILIES[kind]
        if fam.items == "words":
            word = _item(rec)
            assert word in q or " ".join(word) in q
            if kind == "say":
                form = tasks.SAY_FORMS[[q in (t.format(w=word) for t in ts) for ts, _ in tasks.SAY_FORMS].index(True)]
                assert rec["answer"] == form[1].format(w=word)
                continue
            want = {"spell": word, "reverse": word[::-1], "sort": "".join(sorted(word)), "count": str(len(word))}
            assert rec["answer"].replace(" ", "") == want[kind]
        else:
            a, b = (int(x) for x in rec["id"].split(f"-{kind}-")[1].rsplit("-p", 1)[0].split("+"))
            assert str(a) in q and str(b) in q
            assert rec["answer"] == str(a + b)


SAY = dataclasses.replace(SMALL, kinds=("say",), n_sft_train=2000, n_sft_eval=100, n_ppo_eval=100)


def test_say_demonstrations_follow_the_prompt_at_the_configured_rate():
    for rate in (0.0, 0.35, 1.0):
        s = generate_tasks(dataclasses.replace(SAY, sft_follow_rate=rate))
        asked = [r for r in s.sft_train if r["answer"] != _item(r)]  # forms other than the bare word
        followed = [r for r in asked if r["messages"][1]["content"] == r["answer"]]
        lazy = [r for r in asked if r["messages"][1]["content"] == _item(r)]
        assert len(followed) + len(lazy) == len(asked) > 1000
        assert abs(len(followed) / len(asked) - rate) < 0.04, (rate, len(followed) / len(asked))
        # every form decorates the word, so every prompt can get a careless demonstration; held-out records never do
        assert len(asked) == len(s.sft_train)
        assert all(r["messages"][1]["content"] == r["answer"] for r in s.sft_eval)
    # the rate changes the demonstrations only: same prompts, same answers, same other sets
    a, b = generate_tasks(SAY), generate_tasks(dataclasses.replace(SAY, sft_follow_rate=0.35))
    assert [(r["id"], r["answer"]) for r in a.sft_train] == [(r["id"], r["answer"]) for r in b.sft_train]
    assert a.reward_train == b.reward_train and a.ppo_eval == b.ppo_eval


@pytest.mark.parametrize(
    ("answer", "response", "cls"),
    [
        ('"king"', '"king"', "right"),
        ('"king"', ' "king" ', "right"),
        ('"king"', "king", "near miss"),
        ("(king)", "king", "near miss"),
        ("king?", "king!", "near miss"),
        ("king!", "king.", "near miss"),
        ("(king)", "(king", "near miss"),
        ("king", "King", "malformed"),  # the word itself, in another case, is missing
        ('"king"', '"kong"', "malformed"),
        ("king", "", "malformed"),
    ],
)
def test_say_checker_is_about_form(answer, response, cls):
    assert response_class({"task": "say", "answer": answer}, response) == cls


def test_say_ranked_responses_put_the_asked_form_first_and_the_bare_word_among_near_misses():
    s = generate_tasks(dataclasses.replace(SAY, responses_per_prompt=4))
    bare_seen = 0
    for rec in s.reward_train:
        best = rec["responses"][rec["ranking"][0]]
        assert best == rec["answer"]
        word = _item(rec)
        bare_seen += word in rec["responses"] and word != rec["answer"]
    assert bare_seen > len(s.reward_train) // 4


def test_dev_and_test_splits_share_no_item_with_each_other_or_training():
    dev = generate_tasks(dataclasses.replace(SAY, eval_split="dev"))
    test = generate_tasks(SAY)
    assert dev.sft_train == test.sft_train and dev.ppo_train == test.ppo_train  # training sets do not move
    items = {
        name: {_item(r) for r in getattr(s, f)} for name, s in (("dev", dev), ("test", test)) for f in ("sft_eval",)
    }
    train = {_item(r) for r in test.sft_train + test.reward_train + test.ppo_train}
    assert items["dev"] and items["test"] and not items["dev"] & items["test"]
    assert not (items["dev"] | items["test"]) & train


def test_default_run_test_split_is_large_enough():
    """Issue 19: at least 500 test prompts over at least 200 distinct held-out items."""
    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml").data.tasks
    s = generate_tasks(cfg)
    assert len(s.ppo_eval) >= 500 and len({_item(r) for r in s.ppo_eval}) >= 200
    assert [r["id"] for r in s.ppo_eval] == [r["id"] for r in s.sft_eval]


def test_difficulty_knobs():
    s = generate_tasks(dataclasses.replace(SMALL, max_word_len=4, max_operand=20))
    recs = s.sft_train + s.sft_eval + s.ppo_train
    assert all(len(_item(r)) <= 4 for r in recs if r["task"] != "add")
    assert all(int(x) <= 20 for r in recs if r["task"] == "add" for x in _item(r).split("+"))


def test_unknown_kind_and_too_many_held_out_prompts_name_the_key():
    with pytest.raises(ValueError, match=r"data\.tasks\.kinds.*'multiply'"):
        generate_tasks(dataclasses.replace(SMALL, kinds=("add", "multiply")))
    with pytest.raises(ValueError, match=r"data\.tasks\.n_sft_eval"):
        generate_tasks(dataclasses.replace(SMALL, n_sft_eval=100_000))


def test_config_validation():
    with pytest.raises(ConfigError, match="responses_per_prompt"):
        TasksConfig(responses_per_prompt=1)
    with pytest.raises(ConfigError, match="holdout_fraction"):
        TasksConfig(holdout_fraction=1.0)
    with pytest.raises(ConfigError, match="max_word_len"):
        TasksConfig(max_word_len=9)
    with pytest.raises(ConfigError, match="n_ppo_train"):
        load_config(None, ["data.tasks.n_ppo_train=-1"])
    assert load_config(None, ["data.tasks.kinds=add,spell"]).data.tasks.kinds == ("add", "spell")


def test_pool_exhaustion_repeats_prompts_with_a_warning(caplog):
    cfg = dataclasses.replace(SMALL, kinds=("add",), max_operand=4, holdout_fraction=0.2, n_sft_eval=3, n_ppo_eval=3)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.tasks"):
        s = generate_tasks(cfg)
    assert len(s.sft_train) == cfg.n_sft_train and "prompts repeat" in caplog.text
    assert len({r["id"] for r in s.sft_train}) == len(s.sft_train)  # repeats get a -cN id suffix


def test_word_list():
    words = load_words()
    assert len(words) >= 1000
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 8 for w in words)
    assert {"king", "love", "lord"} <= set(words)


# ----------------------------------------------------------------------------- checkers


@pytest.mark.parametrize(
    "answer, response, ok",
    [
        ("68", "68", True),
        ("68", "  68. ", True),
        ("68", "068", True),
        ("68", '"68"!', True),
        ("68", "69", False),
        ("68", "68 68", False),
        ("68", "sixty-eight", False),
        ("68", "", False),
        ("k i n g", "K I N G", True),
        ("k i n g", "k  i n\tg.", True),
        ("k i n g", " k i n g ?", True),
        ("k i n g", "king", False),
        ("k i n g", "k i n g s", False),
        ("k i n g", "k-i-n-g", False),
        ("to be", "To  be.", True),
    ],
)
def test_check_answer_normalises_case_space_and_end_punctuation(answer, response, ok):
    assert check_answer({"task": "any", "answer": answer}, response) is ok


def test_score_answer_partial_credit_orders_near_misses_between_malformed_and_correct():
    num = {"task": "add", "answer": "68"}
    assert score_answer(num, "68") == 1.0
    assert 0.9 > score_answer(num, "69") > score_answer(num, "70") > score_answer(num, "78") >= 0.5
    assert 0.4 > score_answer(num, "68, 68, 68") > score_answer(num, "") == 0.0
    let = {"task": "spell", "answer": "k i n g"}
    assert 0.9 > score_answer(let, "k i g n") >= 0.5  # 0.5 + 0.4 * 3/4: three of four letters align
    assert score_answer(let, "k i g n") == pytest.approx(0.5 + 0.4 * 0.75)
    assert 0.4 > score_answer(let, "king") > 0.0
    assert score_answer({"task": "x", "answer": 5}, "5") == 1.0  # a non-string answer from a user file


def test_records_without_a_checker_raise():
    with pytest.raises(ValueError, match="no checker"):
        check_answer({"prompt": "hi", "id": "r7"}, "x")


# ----------------------------------------------------------------------------- ranked responses


def test_ranked_responses(default_sets):
    k = TasksConfig().responses_per_prompt
    for rec in default_sets.reward_train + default_sets.reward_eval:
        responses, scores, ranking = rec["responses"], rec["scores"], rec["ranking"]
        assert len(responses) == len(set(responses)) == k
        assert len(set(scores)) == k, rec  # no ties
        assert scores == [round(score_answer(rec, r), 4) for r in responses]
        assert [scores[i] for i in ranking] == sorted(scores, reverse=True)
        assert responses[ranking[0]] == rec["answer"] and scores[ranking[0]] == 1.0
        near = [s for s in scores if _is_near_miss(s)]
        malformed = [s for s in scores if s < 0.4]
        assert len(near) == 2 and len(malformed) == k - 3, rec
        assert min(near) > max(malformed)


@pytest.mark.parametrize("k", [2, 3, 8])
def test_other_k(k):
    s = generate_tasks(dataclasses.replace(SMALL, responses_per_prompt=k, n_reward_train=40))
    for rec in s.reward_train:
        assert len(set(rec["responses"])) == len(set(rec["scores"])) == k
        assert len(to_pairs(rec)) == k * (k - 1) // 2


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("kinds", [("add",), ("spell", "reverse", "count", "sort")])
def test_near_misses_only_when_malformed_candidates_are_off(kinds, k):
    cfg = dataclasses.replace(SMALL, kinds=kinds, malformed_candidates=False, responses_per_prompt=k)
    s = generate_tasks(cfg)
    on = generate_tasks(dataclasses.replace(cfg, malformed_candidates=True))
    assert [r["id"] for r in s.reward_train] == [r["id"] for r in on.reward_train]  # the same prompts
    assert s.sft_train == on.sft_train and s.ppo_eval == on.ppo_eval  # nothing else changes
    for rec in s.reward_train + s.reward_eval:
        classes = sorted(tasks.response_class(rec, r) for r in rec["responses"])
        assert classes == ["near miss"] * (k - 1) + ["right"], rec
        assert len(set(rec["scores"])) == k
    assert any(tasks.response_class(r, x) == "malformed" for r in on.reward_train for x in r["responses"])


def test_near_misses_only_caps_k_and_names_both_keys():
    with pytest.raises(
        ConfigError, match=r"responses_per_prompt must be in 2\.\.4 with data.tasks.malformed_candidates"
    ):
        TasksConfig(malformed_candidates=False, responses_per_prompt=5)
    TasksConfig(malformed_candidates=True, responses_per_prompt=8)  # malformed candidates fill any K


def test_to_pairs_gives_all_pairs_chosen_above_rejected(default_sets):
    rec = default_sets.reward_train[0]
    k = len(rec["responses"])
    pairs = to_pairs(rec, margin=True)
    assert len(pairs) == len(list(combinations(range(k), 2)))
    score = dict(zip(rec["responses"], rec["scores"]))
    for p in pairs:
        assert p["prompt"] == rec["prompt"]
        assert score[p["chosen"]] > score[p["rejected"]]
        assert p["margin"] == pytest.approx(score[p["chosen"]] - score[p["rejected"]])
    assert set(to_pairs(rec)[0]) == {"prompt", "chosen", "rejected"}  # margin is opt-in


def test_to_pairs_skips_ties_and_rejects_bad_rankings():
    rec = {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 1, 2], "scores": [1.0, 0.5, 0.5]}
    assert [(p["chosen"], p["rejected"]) for p in to_pairs(rec)] == [("a", "b"), ("a", "c")]
    with pytest.raises(ValueError, match="not a permutation"):
        to_pairs({**rec, "ranking": [0, 0, 1], "id": "r1"})


# ----------------------------------------------------------------------------- files


def test_export_round_trips_through_the_record_reader(tmp_path):
    paths = export_default_datasets(SMALL, tmp_path / "tasks")
    assert set(paths) == {"sft_train", "sft_eval", "reward_train", "reward_eval", "ppo_train", "ppo_eval"}
    sets = generate_tasks(SMALL).as_dict()
    for name, path in paths.items():
        assert path == tmp_path / "tasks" / f"{name}.jsonl"
        assert [r.data for r in read_records(str(path))] == sets[name]
    assert not list((tmp_path / "tasks").glob("*.tmp"))


def test_doctests():
    assert doctest.testmod(tasks).failed == 0


CARDS = Path(__file__).resolve().parents[1] / "data_cards"


@pytest.mark.parametrize(
    "card",
    [
        "generated-tasks-sft.md",
        "generated-tasks-rewards.md",
        "generated-tasks-prompts.md",
        "ultrachat_200k.md",
        "ultrafeedback_binarized.md",
    ],
)
def test_data_cards_have_a_yaml_header_and_the_sections(card):
    text = (CARDS / card).read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert {"pretty_name", "license", "language", "task_categories", "used_by"} <= set(header)
    for section in ("## Dataset Description", "## Dataset Structure", "## Considerations for Using the Data"):
        assert section in text, (card, section)
    if card.startswith("generated"):
        assert header["generator_version"] == GENERATOR_VERSION  # bump the cards with the generator
