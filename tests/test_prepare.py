"""Data preparation as users bring data: multi-turn chats, ShareGPT, mixtures, dirty rows, bad files, the cache,
the inspector. Labels are checked token by token on the tiny model's tokenizer (SmolLM2's, with its chat template)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_lab import data, encode, models, prepare
from qlora_lab.errors import UserError
from tests.conftest import compose_train

ROOT = Path(__file__).resolve().parent.parent
CHAT = [{"role": "system", "content": "You count."},
        {"role": "user", "content": "One?"}, {"role": "assistant", "content": "Uno."},
        {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Dos."},
        {"role": "user", "content": "Three?"}, {"role": "assistant", "content": "Tres."}]


@pytest.fixture(scope="module")
def tokenizer():
    cfg = compose_train(["model=tiny-random"])
    return models.build_tokenizer(cfg.model, models.resolve_model_path(cfg.model.name_or_path))


@pytest.fixture
def logs(monkeypatch):
    """The messages qlora_lab.data and qlora_lab.prepare log, recorded at the logger calls themselves (other tests'
    logging setup — Hydra's, transformers' — may stop records from reaching pytest's caplog)."""
    seen: list[str] = []
    for module in (data, prepare):
        for level in ("info", "warning"):
            monkeypatch.setattr(module.log, level, lambda msg, *args: seen.append(msg % args))
    return seen


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LAB_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepared(tokenizer, path, *extra, run_dir=None):
    cfg = compose_train(["model=tiny-random", "data=file", f"data.path={path}", *extra])
    return prepare.prepare(cfg, tokenizer, run_dir)


def trained_texts(tokenizer, ds) -> list[list[str]]:
    return [encode.trained_spans(r["input_ids"], r["labels"], tokenizer) for r in ds]


def test_every_assistant_turn_of_a_conversation_is_trained_and_nothing_else(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 4)
    p = prepared(tokenizer, path, f"data.eval_path={path}")
    for spans in trained_texts(tokenizer, p.train):
        # each answer with the template's end of turn (how the model learns to stop); no system/user/header token
        assert spans == ["Uno.<|im_end|>\n", "Dos.<|im_end|>\n", "Tres.<|im_end|>\n"]


@pytest.mark.parametrize("train_on, expected", [
    ("last_assistant", ["Tres.<|im_end|>\n"]),
    ("all", None),  # every token
])
def test_train_on_modes(tokenizer, tmp_path, train_on, expected):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 3)
    p = prepared(tokenizer, path, f"data.eval_path={path}", f"data.train_on={train_on}")
    row = p.train[0]
    if expected is None:
        assert row["labels"] == row["input_ids"]
    else:
        assert trained_texts(tokenizer, [row])[0] == expected


def test_prompt_completion_rows_train_exactly_what_trls_own_rule_trains(tokenizer):
    """The demo's rows (and with them its numbers) are unchanged: same ids and labels as TRL 1.16's tokenization of
    conversational prompt/completion rows (prompt + generation prompt masked, the rest trained)."""
    from trl.data_utils import common_prefix_length

    from qlora_lab import task

    p = prepare.prepare(compose_train(["model=tiny-random", "data.max_train_samples=40"]), tokenizer)
    for row, enc in zip(task.demo_rows(40, "train", 0), p.train):
        prompt = [{"role": "user", "content": row["prompt"]}]
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": row["completion"]}],
                                             tokenize=True, return_dict=True)["input_ids"]
        prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
        n = common_prefix_length(prompt_ids, full)
        assert enc["input_ids"] == full and enc["labels"] == [-100] * n + full[n:]


def test_lookup_and_per_prefix_rules_agree(tokenizer):
    """The fast lookup of the answers in the rendered chat gives the spans of the per-prefix rule."""
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    probe = encode.template_probe(tokenizer)
    assert probe is not None
    fast = encode.answer_spans(tokenizer, CHAT, full, 0, "all_assistant", probe)
    slow = encode.answer_spans(tokenizer, CHAT, full, 0, "all_assistant", None)
    assert fast == slow and len(fast) == 3


def test_sharegpt_rows_prepare_exactly_like_the_same_messages_rows(tokenizer, tmp_path):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    share = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]}] * 3
    a = prepared(tokenizer, write_jsonl(tmp_path / "sharegpt.jsonl", share), "data.eval_fraction=0.34")
    b = prepared(tokenizer, write_jsonl(tmp_path / "messages.jsonl", [{"messages": CHAT}] * 3),
                 "data.eval_fraction=0.34")
    assert a.stats["sources"][0]["format"] == "sharegpt"
    assert a.train.to_dict()["input_ids"] == b.train.to_dict()["input_ids"]
    assert a.train.to_dict()["labels"] == b.train.to_dict()["labels"]


def test_custom_role_and_key_names(tokenizer, tmp_path):
    rows = [{"dialog": [{"speaker": "customer", "text": "Hi?"}, {"speaker": "agent", "text": "Hello."}]}] * 3
    p = prepared(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), "data.eval_fraction=0.34",
                 "data.message_keys={messages:dialog,role:speaker,content:text}",
                 "data.roles={customer:user,agent:assistant}")
    assert trained_texts(tokenizer, p.train) == [["Hello.<|im_end|>\n"]] * 2


def test_trailing_user_turns_are_dropped_and_tool_turns_pass_through(tokenizer, tmp_path, logs):
    tool_chat = [{"role": "user", "content": "Weather?"},
                 {"role": "assistant", "content": "", "tool_calls": [
                     {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
                 {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "It rains."},
                 {"role": "user", "content": "Thanks"}]
    p = prepared(tokenizer, write_jsonl(tmp_path / "t.jsonl", [{"messages": tool_chat}] * 3),
                 "data.eval_fraction=0.34")
    assert sum("3 conversation(s) end after their last assistant answer" in m for m in logs) == 1  # once, counted
    text = tokenizer.decode(p.train[0]["input_ids"])
    assert "Thanks" not in text and "rain" in text  # the trailing user turn went; the tool turn stayed
    assert trained_texts(tokenizer, p.train)[0][-1] == "It rains.<|im_end|>\n"


def test_mixture_realises_its_weights_within_two_percent(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(10_000)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": f"b{i}"},
                                                         {"role": "assistant", "content": "y"}]}
                                           for i in range(10_000)])
    cfg = compose_train(["data=mixture", f"data.sources=[{{path: {a}, weight: 0.7}}, {{path: {b}, weight: 0.3}}]",
                         "data.max_train_samples=10000"])
    splits = data.load_splits(cfg.data)
    shares = [s["share"] for s in splits.stats["sources"]]
    assert len(splits.train) == 10_000 and abs(shares[0] - 0.7) <= 0.02 and abs(shares[1] - 0.3) <= 0.02
    assert [s["format"] for s in splits.stats["sources"]] == ["prompt_completion", "messages"]
    assert {r["source"] for r in splits.eval.to_list()} == {0, 1}  # each source holds out its own rows


def test_bad_rows_skip_records_exactly_the_bad_rows(tokenizer, tmp_path):
    good = {"prompt": "q", "completion": "a"}
    lines = [json.dumps(good)] * 20
    bad = {4: '{"prompt": "q", "completion": ""}', 9: "{not json", 15: '{"prompt": "q", "completion": 3}'}
    for i, line in bad.items():
        lines[i] = line
    path = tmp_path / "dirty.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"row 5: field 'completion' must be a non-empty string.*3 bad rows"):
        prepared(tokenizer, path)
    run = tmp_path / "run"
    run.mkdir()
    p = prepared(tokenizer, path, "data.bad_rows=skip", "data.max_bad_fraction=0.2", run_dir=run)
    skipped = [json.loads(line) for line in (run / "skipped_rows.jsonl").read_text().splitlines()]
    assert [s["row"] for s in skipped] == [5, 10, 16] and [s["raw"] for s in skipped] == list(bad.values())
    assert p.stats["train_rows"] + p.stats["eval_rows"] == 17
    with pytest.raises(UserError, match=r"3 of 20 rows \(15.0%\) cannot be used, more than data.max_bad_fraction"):
        prepared(tokenizer, path, "data.bad_rows=skip")


@pytest.mark.parametrize("content, needle", [
    ('{"prompt": "caf\xe9", "completion": "a"}\n'.encode("latin-1"), r"not UTF-8 text: byte 15 \(line 1\) is 0xe9"),
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "this is a binary file"),
])
def test_non_utf8_and_binary_files_are_one_error(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        data.load_splits(compose_train(["data=file", f"data.path={path}"]).data)


def test_cache_is_reused_and_invalidated_by_template_and_max_length(tokenizer, tmp_path, fresh_cache, logs):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 6)
    first = prepared(tokenizer, path)
    assert not first.from_cache
    logs.clear()
    again = prepared(tokenizer, path)
    assert any(m.startswith("Prepared data from cache") for m in logs) and again.from_cache
    assert again.train.to_dict() == first.train.to_dict()
    entries = lambda: sorted(p.name for p in fresh_cache.iterdir() if not p.name.startswith("."))  # noqa: E731
    assert len(entries()) == 1
    prepared(tokenizer, path, "trainer.max_length=30")
    assert len(entries()) == 2
    template = tokenizer.chat_template
    try:
        tokenizer.chat_template = template.replace("<|im_start|>", "<|im_start|> ")
        prepared(tokenizer, path)
    finally:
        tokenizer.chat_template = template
    assert len(entries()) == 3
    path.write_text(path.read_text() + json.dumps({"messages": CHAT}) + "\n")  # the data changed
    prepared(tokenizer, path)
    assert len(entries()) == 4


def test_truncation_is_counted_and_rows_without_a_trained_token_dropped(tokenizer, tmp_path):
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": CHAT}] * 4 + [{"messages": long}] * 2)
    p = prepared(tokenizer, path, "trainer.max_length=64", f"data.eval_path={path}")
    assert p.stats["dropped_without_trained_tokens"]["train"] == 2 and len(p.train) == 4
    assert all(n <= 64 for n in p.train["length"])


def test_streaming_reads_a_local_file_lazily(tokenizer, tmp_path):
    from datasets import IterableDataset

    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": CHAT}] * 10)
    p = prepared(tokenizer, path, "data.streaming=true", "data.max_eval_samples=2", "trainer.max_steps=2")
    assert isinstance(p.train, IterableDataset) and len(p.eval) == 2
    assert len(list(p.train)) == 8
    assert trained_texts(tokenizer, list(p.train.take(1)))[0][0] == "Uno.<|im_end|>\n"


@pytest.mark.parametrize("overrides, needle", [
    (["data=mixture"], "data.source=mixture needs data.sources"),
    (["data=mixture", "data.sources=[{path: tests/data/messages.jsonl, wieght: 2}]"], "did you mean 'weight'"),
    (["data.streaming=true", "data=file", "data.path=tests/data/messages.jsonl"], "needs trainer.max_steps"),
    (["data.train_on=assistant"], "data.train_on='assistant'"),
    (["data.roles={human:person}"], "data.roles.human='person'"),
])
def test_validator_names_data_problems(overrides, needle):
    from qlora_lab.validate import validate

    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        validate(compose_train(overrides))


@pytest.mark.integration
def test_inspect_cli_marks_the_trained_tokens_and_writes_json(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 5)
    out = tmp_path / "inspect.json"
    proc = subprocess.run([sys.executable, "-m", "qlora_lab", "inspect", "model=tiny-random", "data=file",
                           f"data.path={path}", "inspect.rows=2", f"inspect.json={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = json.loads(out.read_text())
    assert [r["trained"] for r in shown["rows"]] == [["Uno.<|im_end|>\n", "Dos.<|im_end|>\n", "Tres.<|im_end|>\n"]] * 2
    assert "[[Uno.<|im_end|>\n]]" in proc.stdout and "trained" in proc.stdout
    assert shown["summary"]["train_tokens"]["trained_share"] < 0.5


@pytest.mark.integration
@pytest.mark.parametrize("content", [b"\xff\xfe{\0\"\0", b'{"prompt": "caf\xe9", "completion": "a"}\n'])
def test_bad_files_end_in_one_error_line_from_the_cli(tmp_path, content):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "qlora_lab", "prepare", "model=tiny-random", "data=file",
                           f"data.path={path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0]


def test_a_template_that_refuses_a_conversation_is_one_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 3)
    template = tokenizer.chat_template
    tokenizer.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role "
                               "not supported') }}{% endif %}{{ m.content }}{% endfor %}")
    try:
        with pytest.raises(UserError, match=r"chat template refuses a conversation .*System role not supported.*"
                                            r"roles \['system', 'user'"):
            prepared(tokenizer, path, "data.eval_fraction=0.34")
    finally:
        tokenizer.chat_template = template


@pytest.mark.integration
def test_training_on_multi_turn_chats_streamed_and_cached(tmp_path, captured):
    """A chat file trains through the CLI's train(): streamed (2 steps), then prepared (from the cache the second
    time); the trainer's rows carry the labels prepare() made."""
    from qlora_lab.train import train
    from tests.conftest import TINY

    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 12)
    base = [*TINY, "data=file", f"data.path={path}", "trainer.max_steps=2"]
    streamed = train(compose_train([*base, "data.streaming=true", "data.max_eval_samples=2"], tmp_path / "s"))
    assert streamed["status"] == "completed" and streamed["global_step"] == 2 and streamed["train_rows"] is None
    first = train(compose_train(base, tmp_path / "a"))
    again = train(compose_train(base, tmp_path / "b"))
    assert (first["data_from_cache"], again["data_from_cache"]) == (False, True)
    trainer = captured["trainer"]
    row = trainer.train_dataset[0]
    spans = encode.trained_spans(row["input_ids"], row["labels"], trainer.processing_class)
    assert spans == ["Uno.<|im_end|>\n", "Dos.<|im_end|>\n", "Tres.<|im_end|>\n"]
    assert json.loads((tmp_path / "b" / "data.json").read_text())["train_rows"] == len(trainer.train_dataset)
