"""Data loading: every format and file type, the demo task, and clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_lab import data, task
from qlora_lab.errors import UserError
from tests.conftest import compose_train

DATA = Path(__file__).parent / "data"


def load(path, *extra):
    """(train, held-out) rows of a data file, converted: each a list of {"messages", "train_from"} or {"text"}."""
    cfg = compose_train(["data=file", f"data.path={path}", *extra])
    splits = data.load_splits(cfg.data)
    return rows(splits.train), rows(splits.eval)


def rows(ds) -> list[dict]:
    out = []
    for r in ds.to_list():
        out.append({"text": r["text"]} if r["chat"] is None else
                   {"messages": json.loads(r["chat"]), "train_from": r["train_from"]})
    return out


def test_prompt_completion_jsonl_becomes_conversational_with_holdout():
    train, evals = load(DATA / "prompt_completion.jsonl", "data.eval_fraction=0.25")
    assert (len(train), len(evals)) == (12, 4)
    row = train[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"] and row["train_from"] == 1
    all_prompts = {r["messages"][0]["content"] for r in train} | {r["messages"][0]["content"] for r in evals}
    assert len(all_prompts) == 16  # nothing lost, nothing duplicated between splits


def test_messages_rows_keep_the_whole_conversation():
    train, evals = load(DATA / "messages.jsonl", "data.eval_fraction=0.2")
    row = (train + evals)[0]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"] and row["train_from"] == 0


def test_instruction_json_joins_instruction_and_input():
    train, evals = load(DATA / "instruction.json", "data.system_prompt=You reverse words.")
    system, user, answer = train[0]["messages"]
    assert system == {"role": "system", "content": "You reverse words."} and train[0]["train_from"] == 2
    assert user["content"].startswith("Reverse the word.\n\n")
    assert answer["content"] == user["content"].split("\n\n")[1][::-1]


def test_csv_text_rows_stay_plain_text():
    train, _ = load(DATA / "text.csv")
    assert all(set(r) == {"text"} for r in train) and train[0]["text"].startswith("Line")


def test_parquet_and_column_renames(tmp_path):
    import pandas as pd

    rows = [json.loads(l) for l in (DATA / "wrong_columns.jsonl").read_text().splitlines()]
    pd.DataFrame(rows).to_parquet(tmp_path / "qa.parquet")
    train, evals = load(tmp_path / "qa.parquet", "data.columns={question:prompt,answer:completion}")
    assert len(train) + len(evals) == 16 and all("messages" in r for r in train)


def test_explicit_eval_path_is_used_as_is():
    train, evals = load(DATA / "prompt_completion.jsonl", f"data.eval_path={DATA / 'prompt_completion.jsonl'}")
    assert len(train) == 16 and len(evals) == 16


def test_malformed_jsonl_names_the_line():
    with pytest.raises(UserError, match=r"malformed\.jsonl:3: malformed JSON"):
        load(DATA / "malformed.jsonl")


def test_wrong_columns_lists_what_was_found_and_the_fix():
    with pytest.raises(UserError) as e:
        load(DATA / "wrong_columns.jsonl")
    assert "['answer', 'question']" in str(e.value) and "data.columns" in str(e.value)


def test_forced_format_with_missing_columns():
    with pytest.raises(UserError, match=r"data.format=messages needs column\(s\) \['messages'\]"):
        load(DATA / "prompt_completion.jsonl", "data.format=messages")


@pytest.mark.parametrize("row, needle", [
    ({"prompt": "", "completion": "x"}, "field 'prompt' must be a non-empty string"),
    ({"prompt": "q", "completion": 3}, "field 'completion' must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0] has role 'robot'"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "nothing to answer"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"}]}, "nothing to answer"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": "a"}, "'completion' must be a non-empty list"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     "'completion' must be one assistant message"),
])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_bad_rows_name_row_and_field(tmp_path, row, needle, system):
    path = tmp_path / "d.jsonl"
    good = {"prompt": "q", "completion": "a"} if "prompt" in row else {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError) as e:
        load(path, *([f"data.system_prompt={system}"] if system else []))
    assert needle in str(e.value) and "row 2" in str(e.value)


def test_trl_conversational_prompt_completion_rows(tmp_path):
    path = tmp_path / "conv.jsonl"
    row = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
           "completion": [{"role": "assistant", "content": "a"}]}
    path.write_text("\n".join(json.dumps(row) for _ in range(4)) + "\n")
    train, _ = load(path, "data.system_prompt=ignored: the row has its own")
    assert train[0] == {"messages": row["prompt"] + row["completion"], "train_from": 2}


def test_hub_eval_path_is_a_split_of_the_same_dataset(monkeypatch):
    calls = []
    from datasets import Dataset

    monkeypatch.setattr(data, "_read_hub", lambda src, path, split, streaming: calls.append((path, split)) or
                        Dataset.from_list([{"prompt": f"q{i}", "completion": "a"} for i in range(3)]))
    cfg = compose_train(["data=hub", "data.path=org/ds", "data.eval_path=test"])
    splits = data.load_splits(cfg.data)
    assert calls == [("org/ds", "train"), ("org/ds", "test")] and (len(splits.train), len(splits.eval)) == (3, 3)


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no rows"):
        load(tmp_path / "empty.jsonl")


def test_demo_task_is_deterministic_and_heldout_vocabulary_is_disjoint():
    assert task.demo_rows(20, "train") == task.demo_rows(20, "train")
    train, evals = task.demo_rows(300, "train"), task.demo_rows(100, "eval")
    names = lambda rows: {json.loads(r["completion"])["name"] for r in rows}  # noqa: E731
    cities = lambda rows: {json.loads(r["completion"])["city"] for r in rows}  # noqa: E731
    assert not names(train) & names(evals) and not cities(train) & cities(evals)
    for r in evals[:20]:  # every fact of the answer is stated in the prompt
        fact = json.loads(r["completion"])
        assert all(str(v) in r["prompt"] for v in fact.values())


def test_demo_splits_through_the_loader():
    cfg = compose_train(["data.max_train_samples=10", "data.max_eval_samples=5"])
    splits = data.load_splits(cfg.data)
    assert (len(splits.train), len(splits.eval)) == (10, 5)


@pytest.mark.parametrize("answer, ok", [
    ('{"name": "Ana", "age": 30}', True),
    ('  {"age": 30, "name": "Ana"}\n', True),  # key order and whitespace do not matter
    ('{"name": "Ana", "age": "30"}', False),  # but types do
    ('Sure! {"name": "Ana", "age": 30}', False),  # and so does the exact format
    ('', False),
])
def test_json_match(answer, ok):
    assert task.score_answer("json_match", answer, '{"name": "Ana", "age": 30}') is ok


def test_malformed_csv_names_the_parser_error_and_row(tmp_path):
    (tmp_path / "bad.csv").write_text('prompt,completion\nq,a\nq,"unclosed\n')
    with pytest.raises(UserError, match=r"bad.csv: could not read as csv: ParserError: .*row 2.*Fix the file"):
        load(tmp_path / "bad.csv")
