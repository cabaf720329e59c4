"""`qlora-lab <command> [hydra overrides...]`: pick the command's Hydra app and hand it the rest of argv."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

from qlora_lab.commands import COMMANDS, PLAIN_COMMANDS

USAGE = "usage: qlora-lab <command> [overrides...]   (add --help after a command for its config)\n\ncommands:\n" + \
    "\n".join(f"  {name:<8} {doc}" for name, (_, doc) in COMMANDS.items()) + \
    '\n\ntab completion: eval "$(qlora-lab train -sc install=bash)"   ' \
    '(zsh: install=zsh; fish: -sc install=fish | source)'


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if "-sc" in argv or "--shell-completion" in argv:  # before the command check: Hydra's script sends none
        from qlora_lab import completion

        sys.exit(completion.main(argv))
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}.\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if command == "train":
        from qlora_lab.cpu import allocator

        # before anything is allocated: re-executes with LD_PRELOAD (once) if needed — only when this is the program
        allocator.exec_with(argv, entry_point=from_command_line)
    conf = Path(__file__).resolve().parent.parent / "conf"  # config.CONF_DIR, without importing torch for this check
    if not conf.is_dir():
        print(f"error: the configs are not at {conf}: qlora_lab runs from its checkout. Fix: in the checkout, "
              "`pip install -e .` (make does), or run `python -m qlora_lab` there.", file=sys.stderr)
        sys.exit(2)
    if any(a in ("--help", "-h") for a in rest):
        print(settings_help(command))  # then Hydra's own help: the groups and the composed config
    module_name, _, entry = COMMANDS[command][0].partition(":")
    if command in PLAIN_COMMANDS:
        sys.argv = [f"qlora-lab {command}", *rest]
        getattr(importlib.import_module(module_name), entry or "main")()
        return
    _check_free_text(command, rest)
    module = importlib.import_module(module_name)
    rest = _unknown_keys_to_validator(command, rest)
    if command == "train":
        from qlora_lab.distributed import shared_run_dir

        rest = shared_run_dir(rest)  # torchrun / accelerate: all ranks in one run dir
    _check_run_dir(rest)
    _check_sweeper_storage(rest)
    sys.argv = [f"qlora-lab {command}", *rest]  # Hydra reads its overrides from sys.argv
    getattr(module, entry or "main")()


def settings_help(command: str) -> str:
    """Every setting of ``command``'s schema with the first sentence of its docstring (config.field_help)."""
    import dataclasses

    from qlora_lab.config import SCHEMAS, TrainerConfig, field_help

    schema = SCHEMAS.get(command)
    if schema is None:
        return ""
    lines = [f"Settings of `qlora-lab {command}` (key=value on the command line; docs in qlora_lab/config.py):"]

    def walk(s: type, prefix: str) -> None:
        for f in dataclasses.fields(s):
            sub = f.default_factory if isinstance(f.default_factory, type) else None
            if sub is TrainerConfig:
                lines.append(f"  {prefix}{f.name}.*  TRL's SFTConfig fields (trainer.learning_rate=...; TRL's docs)")
            elif sub is not None and dataclasses.is_dataclass(sub):
                walk(sub, f"{prefix}{f.name}.")
            else:
                doc = " ".join(field_help(s, f.name).split())
                first = re.split(r"(?<!e\.g)(?<!i\.e)\.\s", doc)[0].rstrip(".")  # its first sentence
                lines.append(f"  {prefix}{f.name}  {first[:150]}{'...' if len(first) > 150 else ''}")

    walk(schema, "")
    return "\n".join(lines) + "\n"


def _unknown_keys_to_validator(command: str, argv: list[str]) -> list[str]:
    """``adapter.alhpa=64`` (a key the schema lacks) becomes ``+adapter.alhpa=64``: composed, it is reported by the
    command's validator with every other problem and the closest field, one `error:` and exit 2 (Hydra's own
    composition error would stop at this key and suggest the `+`). Only Hydra's positional overrides are touched,
    not the values of its flags (``-cn train``) nor shell completion's subcommand (``-sc install=bash``)."""
    from hydra._internal.utils import get_args_parser  # Hydra's own command-line parser: the same split as Hydra's

    from qlora_lab.validate import appendable_overrides

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # --version and malformed flags: Hydra reports them itself
        return argv
    if args.shell_completion:  # -sc install=bash: the "overrides" are its subcommand
        return argv
    overrides = args.overrides
    rewritten = iter(zip(overrides, appendable_overrides(command, overrides)))
    pending = next(rewritten, None)
    out = []
    for arg in argv:
        if pending is not None and arg == pending[0]:
            arg, pending = pending[1], next(rewritten, None)
        out.append(arg)
    return out


def _free_text_key(key: str) -> bool:
    """Settings that hold natural-language text: chat's prompt and system_prompt, data.system_prompt,
    adapter.prompt_init_text."""
    name = key.lstrip("+~").rsplit(".", 1)[-1]
    return name.endswith(("prompt", "_text"))


def free_text_problem(command: str, overrides: list[str]) -> str | None:
    """What to tell a user whose text setting Hydra's override parser would reject or misread, or None.

    Hydra parses every ``key=value`` with its override grammar, where commas make a sweep (``Ambiguous value``),
    quotes, brackets, ``(``, ``#``, ``!`` or ``=`` are syntax, and ``true`` / ``1e-3`` become a bool / a float. A
    prompt is full of them. The message gives the argument that works, quoted for the shell and for Hydra (checked
    by parsing it back here), and for chat the other ways in: standard input and prompt_file."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for i, arg in enumerate(overrides):
        key, eq, text = arg.partition("=")
        if not eq or not _free_text_key(key):
            continue
        # an unquoted prompt arrives split by the shell: the words up to the next key=value belong to it
        words = []
        for word in overrides[i + 1:]:
            if "=" in word or word.startswith("-"):
                break
            words.append(word)
        if words:
            text = " ".join([text, *words])
            why = f"the shell split {key}=... into {len(words) + 1} words (it was not in quotes)"
        else:
            try:
                override = parser.parse_override(arg)
            except HydraException:
                why = "Hydra's override parser cannot read it (quotes, brackets, '=', '#', '!' are its syntax)"
            else:
                value = override.value()
                if override.is_sweep_override():
                    why = "Hydra reads its commas as a list of values to sweep over"
                elif isinstance(value, (list, dict)):
                    why = f"Hydra reads it as a {type(value).__name__}"
                elif isinstance(value, (bool, float)) and str(value) != text.strip():
                    why = f"Hydra reads it as the {type(value).__name__} {value}"
                else:
                    continue
        fix = _quoted_override(parser, key, text)
        ways = f"Quote it for the shell and for Hydra: {fix}" if fix else "Pass it another way"
        if command == "chat" and key.lstrip("+") == "prompt":
            run = next((o for o in overrides if o.startswith("run=")), "run=...")
            shown = shlex.quote(text) if len(text) <= 80 else "'<the prompt>'"
            ways += (f"{' — or' if fix else ':'} pipe it in: echo {shown} | qlora-lab chat {run} (or many prompts, "
                     "one per line, from a file: prompt_file=PATH)")
        return f"{key}={text[:60]}{'...' if len(text) > 60 else ''}: {why}. {ways}."
    return None


def _quoted_override(parser, key: str, text: str) -> str | None:
    """``key=<text>`` as one shell word holding a Hydra-quoted string, if it parses back to exactly ``text``."""
    import re

    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    quote = "'" if '"' in text and "'" not in text else '"'
    body = text.replace("${", "\\${")  # OmegaConf would resolve ${...} as an interpolation
    body = re.sub(rf"(\\*){quote}", lambda m: m.group(1) * 2 + "\\" + quote, body)  # escape the quote
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)  # and the backslashes before the closing one
    candidate = f"{key}={quote}{body}{quote}"
    try:
        if OmegaConf.create({"v": parser.parse_override(candidate).value()}).v != text:
            return None
    except HydraException:
        return None
    except Exception:  # noqa: BLE001 - OmegaConf's interpolation grammar errors: then no suggestion
        return None
    if "'" not in candidate:
        return f"'{candidate}'"
    return '"' + re.sub(r'([\\"$`])', r"\\\1", candidate) + '"'  # the shell's double quotes: escape \ " $ `


def _check_free_text(command: str, overrides: list[str]) -> None:
    problem = free_text_problem(command, overrides)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def sweeper_storage_problem(overrides: list[str]) -> str | None:
    """Why the Optuna sweeper cannot open ``hydra.sweeper.storage`` with the installed packages, or None.

    optuna 2.x (hydra-optuna-sweeper 1.3.0 requires it) fails to open a database with SQLAlchemy 2.x: an
    AssertionError in its schema-version check (optuna/storages/_rdb/storage.py get_current_version), raised by the
    sweeper before any job runs, as a traceback."""
    from importlib import metadata

    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("hydra.sweeper.storage=")]
    if not given or given[-1].strip().lower() in ("", "null", "none"):
        return None
    try:
        optuna, sqlalchemy = metadata.version("optuna"), metadata.version("sqlalchemy")
    except metadata.PackageNotFoundError:
        return None  # the sweeper reports what is missing
    if int(optuna.split(".")[0]) < 3 and int(sqlalchemy.split(".")[0]) >= 2:
        return (f"hydra.sweeper.storage={given[-1]}: optuna {optuna} (the Optuna sweeper's) cannot open a database "
                f"with SQLAlchemy {sqlalchemy}. Fix: pip install 'sqlalchemy>=1.4,<2' 'alembic<1.14' (what the "
                "project's [sweep] extra installs), or leave hydra.sweeper.storage unset (the study then lives in "
                "memory).")
    return None


def _check_sweeper_storage(overrides: list[str]) -> None:
    problem = sweeper_storage_problem(overrides)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def _check_run_dir(overrides: list[str]) -> None:
    """A hydra.run.dir that cannot be created gets one clear line: Hydra creates it before any command code runs,
    and its own error is a traceback."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    if not given or any(o in ("-m", "--multirun") for o in overrides):
        return
    try:  # created here as Hydra would a moment later (permission checks alone are wrong for root)
        Path(given[-1]).expanduser().mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=Path(given[-1]).expanduser()).close()
    except OSError as e:
        print(f"error: hydra.run.dir={given[-1]!r} cannot be created or written ({e.strerror}). Fix: choose another "
              "folder with hydra.run.dir=...", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
