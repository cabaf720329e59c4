"""Chat prompts from standard input and from files answer exactly as `prompt=` does; prompts Hydra's override parser
would reject get one line saying how to quote them."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from unittest import mock

import pytest

from qlora_lab import chat as chat_mod
from qlora_lab.cli import free_text_problem
from qlora_lab.errors import UserError
from tests.test_cli import ROOT, assert_clean_failure, run_cli
from tests.test_merge import app_cfg, trained_run

TEXT = "Extract name, age and city: Maria, 29, Lisbon."  # commas and a colon: what Hydra's parser trips on
OTHER = "What's the capital of France?"
GREEDY = ["max_new_tokens=12", "stream=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory, "chat", ["quant=none", "model.dtype=float32", "trainer.bf16=false"])


def ask(run, *overrides: str):
    """(what chat returns, the conversations it handed to the model). The tiny random model answers most prompts
    alike, so equal answers alone would not show that the same text arrived: the conversations do."""
    sent, real = [], chat_mod.reply

    def spy(model, tokenizer, messages, cfg, stream=False):
        sent.append(copy.deepcopy(messages))
        return real(model, tokenizer, messages, cfg, stream)

    with mock.patch.object(chat_mod, "reply", spy):
        return chat_mod.chat(app_cfg("chat", [f"run={run}", *GREEDY, *overrides])), sent


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def direct(run) -> dict[str, str]:
    """The answers of prompt=... (quoted for Hydra, as the error message says)."""
    out = {}
    for text in (TEXT, OTHER):
        out[text], sent = ask(run, f'prompt="{text}"')
        assert sent == [user(text)]
    return out


@pytest.mark.integration
def test_a_prompt_piped_into_stdin_is_answered_as_prompt_is(run, direct, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXT + "\n"))  # echo "..." | qlora-lab chat run=R
    answer, sent = ask(run)
    assert sent == [user(TEXT)] and answer == direct[TEXT]


@pytest.mark.integration
def test_prompt_files_answer_each_line_as_prompt_does_and_write_jsonl(run, direct, tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text(f"{TEXT}\n\n{OTHER}\n")
    answers, sent = ask(run, f"prompt_file={lines}")
    assert sent == [user(TEXT), user(OTHER)] and answers == [direct[TEXT], direct[OTHER]]
    written = [json.loads(x) for x in (tmp_path / "prompts.answers.jsonl").read_text().splitlines()]
    assert written == [{"prompt": TEXT, "answer": direct[TEXT]}, {"prompt": OTHER, "answer": direct[OTHER]}]

    conversations = tmp_path / "chats.jsonl"
    conversations.write_text("\n".join(json.dumps(x) for x in [
        {"id": 7, "messages": [*user(TEXT), {"role": "assistant", "content": "REF"}]},
        [{"role": "system", "content": "Be brief."}, *user(OTHER)],
        {"prompt": TEXT, "completion": "{}"},
    ]) + "\n")
    out = tmp_path / "out" / "answers.jsonl"
    out.parent.mkdir()
    answers, sent = ask(run, f"prompt_file={conversations}", f"answers={out}", "system_prompt=Answer in JSON.")
    system = [{"role": "system", "content": "Answer in JSON."}]
    # the reference answer is not sent; the file's own system message is kept, the others get system_prompt
    assert sent == [[*system, *user(TEXT)], [{"role": "system", "content": "Be brief."}, *user(OTHER)],
                    [*system, *user(TEXT)]]
    with_system, _ = ask(run, f'prompt="{TEXT}"', "system_prompt=Answer in JSON.")
    assert answers[0] == answers[2] == with_system
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["id"] == 7 and rows[0]["reference"] == "REF" and rows[0]["answer"] == answers[0]
    assert rows[1] == {"messages": [{"role": "system", "content": "Be brief."}, *user(OTHER)], "answer": answers[1]}
    assert rows[2]["reference"] == "{}"


@pytest.mark.parametrize("content, needle", [
    ("", "no prompts"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', "chats.jsonl:2: malformed JSON"),
    ('{"text": "hi"}\n', "chats.jsonl:1: expected a list of chat messages"),
    ('[{"role": "assistant", "content": "hi"}]\n', "chats.jsonl:1: the conversation has no message to answer"),
])
def test_bad_prompt_files_name_the_line(tmp_path, content, needle):
    f = tmp_path / "chats.jsonl"
    f.write_text(content)
    with pytest.raises(UserError, match=needle):
        chat_mod.read_prompt_file(str(f))


def test_prompt_and_prompt_file_together_or_an_empty_stdin_are_refused(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="give prompt or prompt_file, not both"):
        chat_mod.chat(app_cfg("chat", [f"run={tmp_path}", "prompt=hi", f"prompt_file={tmp_path / 'p.txt'}"]))
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    with pytest.raises(UserError, match="standard input is empty"):
        chat_mod.read_stdin_prompt()


@pytest.mark.parametrize("args, needles", [
    (["prompt=Extract name, age and city: Maria, 29, Lisbon."],
     ["commas as a list of values to sweep", """'prompt="Extract name, age and city: Maria, 29, Lisbon."'""",
      "echo 'Extract name, age and city: Maria, 29, Lisbon.' | qlora-lab chat run=R", "prompt_file=PATH"]),
    (["prompt=What's", "up,", "doc?"], ["the shell split prompt=... into 3 words", "\"prompt=\\\"What's up, doc?\\\"\""]),
    (["prompt=true"], ["Hydra reads it as the bool True", """'prompt="true"'"""]),
    (["system_prompt=Be brief, exact."], ["""'system_prompt="Be brief, exact."'"""]),
])
def test_prompts_hydra_would_misread_get_the_quoting_that_works(args, needles):
    problem = free_text_problem("chat", ["run=R", *args])
    assert problem is not None and "\n" not in problem
    for needle in needles:
        assert needle in problem, problem


def test_the_suggested_argument_reaches_the_config_as_the_same_text():
    """The quoted argument of the message, through a real shell and Hydra's parser, is the user's text again."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    for text in (TEXT, OTHER, 'He said "no", then ${left}.', "a 'b' \"c\" `d` $HOME \\"):
        problem = free_text_problem("chat", ["run=R", f"prompt={text}"])
        word = problem.split("Quote it for the shell and for Hydra: ")[1].split(" — or pipe it in")[0]
        argv = subprocess.run(["bash", "-c", f"printf '%s' {word}"], check=True, capture_output=True,
                              text=True).stdout
        value = OverridesParser.create().parse_override(argv).value()
        assert OmegaConf.create({"prompt": value}).prompt == text


def test_plain_prompts_pass_untouched():
    assert free_text_problem("chat", ["run=R", "prompt=Hello world", "max_new_tokens=3"]) is None
    assert free_text_problem("chat", ["run=R", """prompt='Extract: Maria, 29'"""]) is None
    assert free_text_problem("train", ["trainer.learning_rate=1e-3,1e-4"]) is None  # a sweep where one is meant


@pytest.mark.integration  # CLI processes
def test_the_command_line_reads_stdin_and_explains_quoting(run):
    env_args = [f"run={run}", *GREEDY]
    proc = subprocess.run([sys.executable, "-m", "qlora_lab", "chat", *env_args], input=TEXT + "\n", cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    quoted = run_cli("chat", *env_args, f'prompt="{TEXT}"')
    assert quoted.returncode == 0 and proc.stdout == quoted.stdout and proc.stdout.strip()
    assert "Chatting with" not in proc.stderr  # answered, not the interactive chat reading lines
    assert_clean_failure(run_cli("chat", *env_args, f"prompt={TEXT}"), "error: prompt=Extract name, age",
                         "Quote it for the shell and for Hydra", "pipe it in")
