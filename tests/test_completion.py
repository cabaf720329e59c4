"""Tab completion as a shell runs it: the script `qlora-lab train -sc install=bash` prints, its function driven with
COMP_LINE / COMP_POINT in bash, and the query under it."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from qlora_lab import completion
from tests.test_cli import ROOT, run_cli

PRESETS = {group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")) for group in ("adapter", "quant")}


def bash_complete(lines: list[str]) -> dict[str, list[str]]:
    """COMPREPLY of the installed bash completion for each command line (the cursor at its end)."""
    script = run_cli("train", "-sc", "install=bash")
    assert script.returncode == 0, script.stderr
    calls = "\n".join(f"COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}; _qlora_lab_complete; "
                      'printf "%s|" "${COMPREPLY[@]}"; echo' for line in lines)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "-c", f"{script.stdout}\n{calls}"], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == len(lines), proc.stdout
    return {line: [r for r in replies.split("|") if r] for line, replies in zip(lines, out)}


@pytest.mark.integration  # bash, and a Python process per completion
def test_the_installed_bash_function_completes_commands_groups_presets_and_fields():
    got = bash_complete(["qlora-lab tr", "qlora-lab train ada", "qlora-lab train adapter=", "qlora-lab train quant=n",
                         "qlora-lab train trainer.", "qlora-lab train trainer.learning_r", "qlora-lab chat ",
                         "qlora-lab train adapter=dora adapter.use_d"])
    assert got["qlora-lab tr"] == ["train "]
    assert "adapter=" in got["qlora-lab train ada"]  # the group; "adapter." (its fields) comes too
    assert set(got["qlora-lab train ada"]) == {"adapter=", "adapter."}
    # bash replaces only the text after "=" (a word break): the replies are the preset names, each a finished word
    assert got["qlora-lab train adapter="] == [f"{p} " for p in PRESETS["adapter"]]
    assert got["qlora-lab train quant=n"] == [f"{p} " for p in PRESETS["quant"] if p.startswith("n")]
    fields = got["qlora-lab train trainer."]
    assert {"trainer.learning_rate=", "trainer.max_steps=", "trainer.per_device_train_batch_size="} <= set(fields)
    assert all(f.startswith("trainer.") for f in fields) and len(fields) > 50  # TRL's SFTConfig fields
    assert got["qlora-lab train trainer.learning_r"] == ["trainer.learning_rate="]
    chat = got["qlora-lab chat "]
    assert {"run=", "prompt=", "prompt_file="} <= set(chat) and not any(c.startswith(("adapter", "trainer"))
                                                                          for c in chat)
    assert got["qlora-lab train adapter=dora adapter.use_d"] == ["adapter.use_dora="]


@pytest.mark.integration  # CLI processes
def test_hydras_own_query_without_the_subcommand_is_answered_from_a_schema_cache(tmp_path):
    """Hydra's installed script calls `qlora-lab -sc query=bash` with the whole line: it gets the command's
    completions (not an "unknown command" error). The first query stores the schemas; the next ones read them."""
    env = {**os.environ, "COMP_LINE": "qlora-lab train trainer.max_st", "COMP_WORDBREAKS": "",
           "QLORA_LAB_CACHE": str(tmp_path)}

    def query() -> list[str]:
        proc = subprocess.run([sys.executable, "-m", "qlora_lab", "-sc", "query=bash"], check=False, cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    assert query() == ["trainer.max_steps="]
    assert len(list((tmp_path / "completion").glob("schemas-*.yaml"))) == 1
    assert query() == ["trainer.max_steps="]
    env["COMP_LINE"] = "qlora-lab train quant="
    assert [c.strip() for c in query()] == [f"quant={p}" for p in PRESETS["quant"]]


def test_scripts_register_qlora_lab_and_call_it_back(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/qlora-lab"])  # not a file here: python -m qlora_lab
    bash = completion.install_script("bash")
    assert bash.rstrip().endswith("-F _qlora_lab_complete qlora-lab")  # one command name, not "qlora-lab train"
    assert f"{shlex.quote(sys.executable)} -m qlora_lab -sc query=bash" in bash
    assert "bashcompinit" in completion.install_script("zsh") and "_qlora_lab_complete" in \
        completion.install_script("zsh")
    fish = completion.install_script("fish")
    assert "complete -c qlora-lab" in fish and "-sc query=fish" in fish


def test_the_query_cuts_what_bash_keeps_before_a_word_break():
    """bash replaces only the text after the last COMP_WORDBREAKS character; fish and zsh replace the whole word."""
    assert completion.candidates("qlora-lab train quant=nf", " \t\n\"'><=;|&(:") == ["nf4 ", "nf4-single "]
    assert completion.candidates("qlora-lab train quant=nf", "") == ["quant=nf4 ", "quant=nf4-single "]
    assert completion.candidates("python -m qlora_lab mer", "") == ["merge "]
    assert completion.candidates("qlora-lab nosuch x", "") == []


def test_folders_complete_for_commands_without_a_config(tmp_path, monkeypatch):
    (tmp_path / "runs" / "nf4").mkdir(parents=True)
    (tmp_path / "runs" / "none").mkdir()
    monkeypatch.chdir(tmp_path)
    assert completion.candidates("qlora-lab compare runs/n", "") == ["runs/nf4/", "runs/none/"]
    assert completion.candidates("qlora-lab runs r", "") == ["runs/"]


def test_every_command_is_completed_one_way_or_the_other():
    from qlora_lab.commands import COMMANDS, PLAIN_COMMANDS

    assert set(COMMANDS) == set(completion.HYDRA_CONFIGS) | set(PLAIN_COMMANDS)
    for name in set(completion.HYDRA_CONFIGS.values()):
        assert (ROOT / "conf" / f"{name}.yaml").is_file()


def test_a_completion_request_without_a_shell_says_how(capsys):
    for argv in (["train", "-sc"], ["-sc", "install=tcsh"]):
        assert completion.main(argv) == 2
        assert 'use -sc install=bash (or zsh, fish) to print the script, e.g. eval "$(qlora-lab train -sc ' \
               'install=bash)"' in capsys.readouterr().err
