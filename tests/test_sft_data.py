"""SFT data: every accepted schema normalises to the same messages; bad records get precise errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.config import DatasetSpec, TasksConfig
from pipeline.data.conversations import last_user_prompt, load_sft_data, normalise_chat
from pipeline.data.records import BadRecord, Record, normalise_all, read_records

EXPECTED = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]

SCHEMAS = {
    "messages": {"messages": EXPECTED},
    "prompt_completion": {"prompt": "What is 2 + 2?", "completion": "4"},
    "prompt_completion_conversational": {
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "completion": [{"role": "assistant", "content": "4"}],
    },
    "question_answer": {"question": "What is 2 + 2?", "answer": "4"},
    "question_numeric_answer": {"question": "What is 2 + 2?", "answer": 4},
    "instruction_output": {"instruction": "What is 2 + 2?", "output": "4"},
    "instruction_empty_input": {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
}


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_each_schema_gives_the_same_messages(name):
    assert normalise_chat(Record("x.jsonl:1", SCHEMAS[name]))["messages"] == EXPECTED


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_file_type_loads_to_messages(tmp_path, suffix):
    rows = {
        ".csv": [SCHEMAS["question_answer"], SCHEMAS["question_answer"]],  # flat columns
        ".parquet": [SCHEMAS["messages"], SCHEMAS["messages"]],  # nested list<struct> column
    }.get(suffix, [SCHEMAS["messages"], SCHEMAS["prompt_completion"], SCHEMAS["instruction_output"]])
    path = _write(tmp_path / f"qa{suffix}", rows)
    out, skipped = normalise_all(read_records(str(path)), normalise_chat)
    assert skipped.skipped == 0
    assert [r["messages"] for r in out] == [EXPECTED] * len(rows)


def test_parquet_rows_of_mixed_schemas_with_null_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {
        "question": ["What is 2 + 2?", None],
        "answer": ["4", None],
        "prompt": [None, "What is 2 + 2?"],
        "completion": [None, "4"],
    }
    pq.write_table(pa.table(cols), tmp_path / "mixed.parquet")
    out, _ = normalise_all(read_records(str(tmp_path / "mixed.parquet")), normalise_chat)
    assert [r["messages"] for r in out] == [EXPECTED, EXPECTED]


def test_instruction_input_is_appended_alpaca_style():
    rec = normalise_chat(Record("a", {"instruction": "Add these.", "input": "2 and 2", "output": "4"}))
    assert rec["messages"][0] == {"role": "user", "content": "Add these.\n\n2 and 2"}


def test_multi_turn_and_checker_fields_pass_through():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Spell cat."},
        {"role": "assistant", "content": "c a t"},
    ]
    rec = normalise_chat(Record("a", {"messages": msgs, "task": "spell", "answer": "c a t", "id": "t-1", "other": 1}))
    assert rec == {"messages": msgs, "task": "spell", "answer": "c a t", "id": "t-1"}
    assert last_user_prompt(rec) == "Spell cat."
    # an "answer" without a "task" is just the question/answer schema: no checker fields
    assert "answer" not in normalise_chat(Record("a", {"question": "q", "answer": "a"}))


BAD = [
    ({"text": "hello"}, "fits no SFT schema", "fields found: text"),
    ({"prompt": "q"}, "no field 'completion'", "'prompt'"),
    ({"question": "q"}, "no field 'answer'", "'question'"),
    ({"instruction": "do"}, "no field 'output'", "'instruction'"),
    ({"question": "", "answer": "4"}, "field 'question' is empty", ""),
    ({"question": "q", "answer": ["4"]}, "field 'answer' must be a string", "list"),
    ({"question": "q", "answer": None}, "no field 'answer'", ""),
    ({"instruction": "do", "input": 3, "output": "x"}, "field 'input' must be a string", ""),
    ({"messages": "hi"}, "field 'messages' must be a non-empty list", ""),
    ({"messages": []}, "field 'messages' must be a non-empty list", ""),
    ({"messages": [{"role": "user", "content": "q"}, "a"]}, "field 'messages[1]' must be an object", ""),
    ({"messages": [{"role": "bot", "content": "q"}]}, "field 'messages[0].role' is 'bot'", ""),
    (
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
        "field 'messages[0].content' must be a string",
        "",
    ),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn", ""),
    ({"messages": EXPECTED + [{"role": "user", "content": "more?"}]}, "must end with an assistant turn", ""),
    (
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
        "field 'completion' must end with an assistant turn",
        "",
    ),
]


@pytest.mark.parametrize(("data", "msg", "also"), BAD)
def test_bad_record_error_names_location_and_field(data, msg, also):
    with pytest.raises(BadRecord) as e:
        normalise_chat(Record("data/qa.jsonl:7", data))
    assert str(e.value).startswith("data/qa.jsonl:7: ")
    assert msg in str(e.value) and also in str(e.value)


def _mixed_file(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps(SCHEMAS["question_answer"]),
        "{not json",
        json.dumps({"question": "q"}),
        json.dumps(["a", "list"]),
        json.dumps(SCHEMAS["prompt_completion"]),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_error_mode_names_file_and_line(tmp_path):
    path = _mixed_file(tmp_path)
    with pytest.raises(BadRecord, match=rf"{path}:2: not valid JSON"):
        load_sft_data(DatasetSpec(source=str(path), eval_fraction=0.0), TasksConfig(), seed=0)


def test_error_names_csv_and_parquet_rows(tmp_path):
    csv_path = _write(tmp_path / "qa.csv", [{"question": "q", "answer": "4"}, {"question": "q2", "answer": ""}])
    with pytest.raises(BadRecord, match=rf"{csv_path}:row 2: field 'answer' is empty"):
        normalise_all(read_records(str(csv_path)), normalise_chat)
    pq_path = _write(tmp_path / "qa.parquet", [{"prompt": "q", "completion": "4"}, {"prompt": "q", "completion": None}])
    with pytest.raises(BadRecord, match=rf"{pq_path}:row 1: record has 'prompt' but no field 'completion'"):
        normalise_all(read_records(str(pq_path)), normalise_chat)


def test_skip_mode_counts_bad_records(tmp_path):
    path = _mixed_file(tmp_path)
    data = load_sft_data(DatasetSpec(source=str(path), on_bad_record="skip", eval_fraction=0.0), TasksConfig(), seed=0)
    assert data.skipped == 3
    assert [r["messages"] for r in data.train] == [EXPECTED, EXPECTED]


def test_eval_split_is_carved_deterministically_and_disjoint(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(40)]
    path = _write(tmp_path / "qa.jsonl", rows)
    spec = DatasetSpec(source=str(path), eval_fraction=0.1)
    a, b = load_sft_data(spec, TasksConfig(), seed=3), load_sft_data(spec, TasksConfig(), seed=3)
    assert len(a.held_out) == 4 and len(a.train) == 36
    assert a.held_out == b.held_out
    q_train = {r["messages"][0]["content"] for r in a.train}
    q_eval = {r["messages"][0]["content"] for r in a.held_out}
    assert not q_train & q_eval and len(q_train | q_eval) == 40


def test_eval_source_file(tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}] * 3)
    held = _write(tmp_path / "held.csv", [{"instruction": "i", "output": "o"}])
    data = load_sft_data(DatasetSpec(source=str(train), eval_source=str(held)), TasksConfig(), seed=0)
    assert len(data.train) == 3 and data.held_out[0]["messages"][1]["content"] == "o"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_sft_data(DatasetSpec(source=str(tmp_path / "nope.jsonl")), TasksConfig(), seed=0)


def test_default_source_uses_generated_tasks_with_checkers():
    tasks = TasksConfig(n_sft_train=8, n_sft_eval=4)
    data = load_sft_data(DatasetSpec(), tasks, seed=0)
    assert len(data.train) == 8 and len(data.held_out) == 4
    for rec in data.train + data.held_out:
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
        assert rec["task"] in tasks.kinds and rec["answer"] == rec["messages"][1]["content"]


def _bad_utf8(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_invalid_utf8_line_is_a_bad_record_with_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "a"}).encode()
    path = _bad_utf8(tmp_path / "qa.jsonl", [good, b'{"question": "caf\xe9", "answer": "a"}', good])
    with pytest.raises(BadRecord, match=rf"{path}:2: not valid UTF-8 \(byte 0xe9 at column 18\)"):
        load_sft_data(DatasetSpec(source=str(path), eval_fraction=0.0), TasksConfig(), seed=0)
    data = load_sft_data(DatasetSpec(source=str(path), eval_fraction=0.0, on_bad_record="skip"), TasksConfig(), 0)
    assert data.skipped == 1 and len(data.train) == 2 and f"{path}:2: not valid UTF-8" in data.skipped_examples[0]


def test_invalid_utf8_in_ppo_prompts_and_csv_rows_names_the_place(tmp_path):
    from pipeline.data.prompts import load_prompts

    good = json.dumps({"prompt": "q"}).encode()
    path = _bad_utf8(tmp_path / "p.jsonl", [good, b'{"prompt": "\xff"}', good])
    with pytest.raises(BadRecord, match=rf"{path}:2: not valid UTF-8"):
        load_prompts(DatasetSpec(source=str(path), eval_fraction=0.0), TasksConfig(), seed=0)
    data = load_prompts(DatasetSpec(source=str(path), eval_fraction=0.0, on_bad_record="skip"), TasksConfig(), 0)
    assert len(data.train) == 2
    csv_path = _bad_utf8(tmp_path / "qa.csv", [b"question,answer", b"q,a", b"q\xc3,a"])
    with pytest.raises(BadRecord, match=rf"{csv_path}:row 2: not valid UTF-8"):
        normalise_all(read_records(str(csv_path)), normalise_chat)
    json_path = _bad_utf8(tmp_path / "qa.json", [b'[{"question": "q",', b'"answer": "\xe9"}]'])
    with pytest.raises(BadRecord, match=rf"{json_path}:2: not valid UTF-8"):
        list(read_records(str(json_path)))


class _CharTokenizer:
    """One token per character, with a toy chat template; fails the test if asked to tokenise a huge text."""

    chat_template = "<role>content"

    @staticmethod
    def _check(text: str) -> None:
        assert len(text) < 10_000, "a record far over the context was tokenised"

    def apply_chat_template(self, messages, tokenize=False, return_dict=False, return_assistant_tokens_mask=False,
                            add_generation_prompt=False):  # fmt: skip
        ids, mask = [], []
        for m in [*messages, *([{"role": "assistant", "content": ""}] if add_generation_prompt else [])]:
            self._check(m["content"])
            head = f"<{m['role']}>"
            ids += [ord(c) for c in head + m["content"]]
            mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(m["content"])
        text = "".join(map(chr, ids))
        return {"input_ids": ids, "assistant_masks": mask} if tokenize else text

    def __call__(self, text, add_special_tokens=False):
        self._check(text)
        return {"input_ids": [ord(c) for c in text]}


HUGE = "x" * 1_000_000  # a single-line record of 1 MB, far over any context here


def test_records_far_over_the_context_are_dropped_or_cut_before_tokenising():
    from pipeline.sft_data import tokenize_examples

    ok = {"messages": EXPECTED}
    huge = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": HUGE}]}
    kept, stats = tokenize_examples(_CharTokenizer(), [ok, huge, ok], max_length=64, too_long="drop")
    assert len(kept) == 2 and stats.n_dropped_too_long == 1 and stats.n_kept == 2
    kept, stats = tokenize_examples(_CharTokenizer(), [huge, ok], max_length=64, too_long="truncate")
    assert [len(e["input_ids"]) for e in kept] == [64, 32] and stats.n_truncated == 1
    assert kept[0]["input_ids"][:14] == [ord(c) for c in "<user>q<assist"] and kept[0]["labels"][-1] == ord("x")
    # a huge user turn leaves no assistant token in the first 64: dropped, counted
    huge_q = {"messages": [{"role": "user", "content": HUGE}, {"role": "assistant", "content": "a"}]}
    kept, stats = tokenize_examples(_CharTokenizer(), [huge_q, ok], max_length=64, too_long="truncate")
    assert len(kept) == 1 and stats.n_truncated == 1 and stats.n_dropped_no_target == 1


def test_ppo_prompts_far_over_the_limit_keep_their_end_without_tokenising_it_all():
    from pipeline.rl.components import render_prompts

    prompts = render_prompts(_CharTokenizer(), [{"messages": [{"role": "user", "content": HUGE + "end"}]}], 16)
    assert prompts == [[ord(c) for c in "xxxxend<assistant>"[-16:]]]
