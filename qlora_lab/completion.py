"""Shell completion for `qlora-lab`: subcommands, then each command's config groups, presets and fields.

    eval "$(qlora-lab train -sc install=bash)"     # bash (or install=zsh); fish: qlora-lab -sc install=fish | source

Hydra's own scripts do not work under a subcommand: `-sc install=bash` of a @hydra.main app registers completion for
the program name Hydra sees (here "qlora-lab train", two words, so `complete` registers both `qlora-lab` and `train`)
and its function calls ``<first word> -sc query=bash`` with the whole line, so Hydra is never told which command's
config to complete. Here the command line answers ``-sc`` itself (cli.main, before any command runs): the scripts
below register ``qlora-lab`` and call ``qlora-lab -sc query=<shell>``; the query reads the line being completed
(``COMP_LINE`` up to ``COMP_POINT``), completes the subcommand while that is the word, and otherwise hands the words
after it to Hydra's completion (hydra.plugins.completion_plugin, the code behind its own scripts) with that command's
config: ``adapter=`` lists the adapter presets, ``trainer.`` the trainer fields, ``data.path=./`` files. Commands
without a Hydra config (report, compare, runs) complete folders.

Speed: composing a config needs the schemas of qlora_lab/config.py, whose ``trainer`` fields are generated from TRL
(importing torch: seconds). The first completion stores the schemas as YAML under the cache root (keyed by
config.py and the trl / transformers / hydra versions); later ones load that and never import torch.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from importlib import metadata
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # config.CONF_DIR, without importing config (torch)
# commands whose arguments are Hydra overrides -> their primary config (the config_name of their @hydra.main)
HYDRA_CONFIGS = {"train": "train", "prepare": "prepare", "inspect": "prepare", "merge": "merge", "export": "export",
                 "chat": "chat", "bench": "bench"}
SHELLS = ("bash", "zsh", "fish")

BASH_SCRIPT = r"""# qlora-lab completion (bash): eval "$(qlora-lab train -sc install=bash)"
_qlora_lab_complete()
{
    local IFS=$'\n'
    COMPREPLY=($(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" COMP_WORDBREAKS="$COMP_WORDBREAKS" \
        %(query)s -sc query=bash 2>/dev/null))
}
complete -o nospace -o default -F _qlora_lab_complete qlora-lab
"""
# zsh runs bash completion functions through bashcompinit (zsh splits words itself: no COMP_WORDBREAKS there)
ZSH_PREAMBLE = ("(( $+functions[compdef] )) || { autoload -U +X compinit && compinit }\n"
                "autoload -U +X bashcompinit && bashcompinit\n")
FISH_SCRIPT = r"""# qlora-lab completion (fish): qlora-lab train -sc install=fish | source
function __qlora_lab_complete
    set -lx COMP_LINE (commandline -cp)
    %(query)s -sc query=fish 2>/dev/null
end
complete -c qlora-lab -f -a '(__qlora_lab_complete)'
"""


def main(argv: list[str]) -> int:
    """``[command] -sc install=SHELL | uninstall=SHELL | query=SHELL``: print a script, or the completions."""
    words = [w for w in argv if w not in ("-sc", "--shell-completion")]
    action, _, shell = next((w for w in words if w.partition("=")[0] in ("install", "uninstall", "query")),
                            "=").partition("=")
    if action not in ("install", "uninstall", "query") or shell not in SHELLS:
        print("error: shell completion: use -sc install=bash (or zsh, fish) to print the script, e.g. "
              'eval "$(qlora-lab train -sc install=bash)"; -sc uninstall=bash removes it.', file=sys.stderr)
        return 2
    if action == "install":
        print(install_script(shell), end="")
    elif action == "uninstall":
        print("complete -c qlora-lab -e; functions -e __qlora_lab_complete" if shell == "fish" else
              "complete -r qlora-lab 2>/dev/null; unset -f _qlora_lab_complete")
    else:
        line = os.environ.get("COMP_LINE", "")
        point = int(os.environ.get("COMP_POINT") or len(line))
        breaks = os.environ.get("COMP_WORDBREAKS", "") if shell == "bash" else ""
        found = candidates(line[:point], breaks)
        if found:
            print("\n".join(found))
    return 0


def query_command() -> str:
    """How the installed script calls this program back: the program that printed it (an absolute path, so the
    script does not depend on PATH), or ``python -m qlora_lab`` when it was started that way."""
    program = Path(sys.argv[0])
    if program.name == "qlora-lab" and program.is_file():
        return shlex.quote(str(program.resolve()))
    return f"{shlex.quote(sys.executable)} -m qlora_lab"


def install_script(shell: str) -> str:
    if shell == "fish":
        return FISH_SCRIPT % {"query": query_command()}
    script = BASH_SCRIPT % {"query": query_command()}
    return ZSH_PREAMBLE + script if shell == "zsh" else script


# --------------------------------------------------------------------------------------------------------------
# the query


def candidates(line: str, wordbreaks: str = "") -> list[str]:
    """The completions of the last word of ``line`` (the command line up to the cursor), for the shell to insert.

    A finished word (a command, ``key=value``) ends with a space; ``adapter=`` / ``trainer.`` / a folder do not, so
    the next TAB goes on. bash replaces only the text after the last ``COMP_WORDBREAKS`` character of the word
    (``=`` and ``:`` are among them), so that part is cut from each completion."""
    words = line.split()
    if not line or line[-1].isspace():
        words.append("")
    words = _after_program(words)
    if words is None:
        return []
    word = words[-1]
    if len(words) == 1:  # the command itself
        found = [f"{c} " for c in _commands() if c.startswith(word)]
        found += [f for f in ("--help",) if word.startswith("-") and f.startswith(word)]
    elif words[0] in HYDRA_CONFIGS:
        found = [_finish(c) for c in hydra_completions(words[0], " ".join(words[1:]))]
    elif words[0] in _commands():  # report / compare / runs: folders and files
        found = [_finish(c) for c in _paths(word)]
    else:
        return []
    cut = max((word.rfind(ch) for ch in wordbreaks), default=-1) + 1 if wordbreaks else 0
    return sorted({c[cut:] for c in found if c.startswith(word)})


def _after_program(words: list[str]) -> list[str] | None:
    """The words after the program: ``qlora-lab ...`` or ``python -m qlora_lab ...``."""
    if not words:
        return None
    if "qlora_lab" in words[:4] and "-m" in words[:3]:
        return words[words.index("qlora_lab") + 1:] or None
    return words[1:] or None


def _commands() -> list[str]:
    from qlora_lab.commands import COMMANDS

    return list(COMMANDS)


def _finish(candidate: str) -> str:
    """A candidate that is complete gets the space that ends the word."""
    return candidate if candidate.endswith(("=", ".", "/")) else candidate + " "


def _paths(word: str) -> list[str]:
    folder, _, prefix = word.rpartition("/")
    base = Path(folder or ".").expanduser()
    if folder == "" and word.startswith("/"):
        base = Path("/")
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    head = f"{folder}/" if folder or word.startswith("/") else ""
    return [head + e.name + ("/" if e.is_dir() else "") for e in entries
            if e.name.startswith(prefix) and (prefix.startswith(".") or not e.name.startswith("."))]


def hydra_completions(command: str, args: str) -> list[str]:
    """Hydra's completions for ``args`` (the words after the command) with the command's config, less the config
    groups of conf/ that the command does not use (Hydra offers every folder of the search path: chat would get
    adapter= and trainer=)."""
    import warnings

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.plugins.completion_plugin import DefaultCompletionPlugin

    register_cached_schemas()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # conf/accelerate/*.yml (accelerate's files, not Hydra's): "deprecated"
        found = DefaultCompletionPlugin(loader)._query(config_name=HYDRA_CONFIGS[command], line=args)
    unused = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} - command_groups(HYDRA_CONFIGS[command])
    out = []
    for c in found:
        group = c.lstrip("+~").split("=")[0].split("/")[0]
        if "=" in c and "." not in c.split("=")[0] and group in unused:
            continue
        out.append(c if c.endswith(("=", ".", "/")) or "=" in c else c + "/")  # a bare group: hydra -> hydra/
    return out


def command_groups(config_name: str) -> set[str]:
    """The config groups in the defaults list of conf/<config_name>.yaml (``model: ...``, ``optional sweep: ...``)."""
    import yaml

    try:
        defaults = (yaml.safe_load((CONF_DIR / f"{config_name}.yaml").read_text()) or {}).get("defaults") or []
    except (OSError, yaml.YAMLError):
        return set()
    keys = [next(iter(d)) for d in defaults if isinstance(d, dict) and d]
    return {k.split()[-1] for k in keys if not k.startswith("override")}


# --------------------------------------------------------------------------------------------------------------
# the schemas, cached


def _cache_file() -> Path:
    """<cache root>/completion/schemas-<key>.yaml; the cache root as models.cache_root() (not imported: torch)."""
    root = Path(os.environ.get("QLORA_LAB_CACHE", Path.home() / ".cache" / "qlora_lab"))
    digest = hashlib.sha256((Path(__file__).parent / "config.py").read_bytes())
    for package in ("trl", "transformers", "hydra-core", "omegaconf"):
        try:
            digest.update(f"{package}={metadata.version(package)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(package.encode())
    return root / "completion" / f"schemas-{digest.hexdigest()[:16]}.yaml"


def register_cached_schemas() -> None:
    """Put the schemas that the configs' defaults lists name (train_schema, chat_schema, ...) into Hydra's
    ConfigStore, as plain configs read from the cache; the first call builds the cache from qlora_lab.config."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if "train_schema.yaml" in ConfigStore.instance().repo:
        return  # qlora_lab.config registered the typed schemas in this process already (tests): keep them
    cache = _cache_file()
    if cache.is_file():
        try:
            schemas = OmegaConf.load(cache)
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt
            schemas = None
        if schemas is not None:
            for name, node in schemas.items():
                ConfigStore.instance().store(name=str(name), node=node)
            return
    from qlora_lab import config  # imports TRL (torch): once per cache key
    from qlora_lab.files import write_text_atomic

    config.register_configs()
    repo = ConfigStore.instance().repo
    names = [n.removesuffix(".yaml") for n, node in repo.items() if n.endswith("_schema.yaml")]
    schemas = OmegaConf.create({n: OmegaConf.to_container(repo[f"{n}.yaml"].node, enum_to_str=True) for n in names})
    try:
        write_text_atomic(cache, OmegaConf.to_yaml(schemas))
    except OSError:
        pass  # a read-only cache: completion still works, at import speed
