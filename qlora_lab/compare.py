"""`qlora-lab compare RUN RUN ...` and `qlora-lab runs [DIR]`: runs side by side, outside sweeps.

A run directory is what `qlora-lab train` writes: ``config.yaml`` (the resolved config, at its start) and
``metrics.json`` (at its end, with its ``status``), plus ``log_history.json`` for the curves.

- ``compare`` prints, and writes to ``<out>/compare.md``, a table of the settings that differ between the runs (their
  config.yaml files, flattened to ``group.field`` keys; ``output_dir`` left out, it always differs), then their
  before → after task scores and eval losses, train loss, tokens/s, peak memory and runtimes (metrics.json); and
  draws ``<out>/compare.png``: the runs' loss curves overlaid, each run's held-out eval points marked (step 0: before
  training), drawn as the run's own loss.png and the sweep report draw them (qlora_lab/report.py).
- ``runs`` lists every run directory under DIR (default: the current folder), newest first, with its status, age,
  key settings and scores.

Neither imports torch: both read files only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlora_lab.errors import EXIT_USER_ERROR, UserError
from qlora_lab.files import write_text_atomic

ALWAYS_DIFFERS = ("output_dir",)  # the run's own folder: never a setting that explains a difference
# folders `runs` does not look into: hidden ones (.venv, .git, .hydra) and what a run dir holds besides its files
SKIP_DIRS = ("checkpoints", "adapter", "merged", "export", "tensorboard", "wandb", "mlruns", "node_modules",
             "__pycache__", "site-packages")


@dataclass
class RunFiles:
    """What a run directory says about itself, read without loading any model."""

    dir: Path
    label: str                      # how the run is named in tables and legends
    config: dict[str, Any]          # config.yaml (else .hydra/config.yaml), flattened to "group.field" keys
    metrics: dict[str, Any]         # metrics.json, {} while a run has not finished
    history: list[dict] = field(default_factory=list)  # log_history.json (the Trainer's log)

    @property
    def status(self) -> str:
        return self.metrics.get("status") or "incomplete"

    @property
    def modified(self) -> float:
        """When the run last wrote one of its files (seconds since the epoch)."""
        files = [self.dir / f for f in ("metrics.json", "config.yaml", "log_history.json", "environment.json")]
        return max([f.stat().st_mtime for f in files if f.is_file()] or [self.dir.stat().st_mtime])


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is a `qlora-lab train` run: its metrics.json, or the config.yaml and environment.json that
    train() writes when it starts (a run still training, or killed, has no metrics.json yet)."""
    return (folder / "metrics.json").is_file() or \
        ((folder / "config.yaml").is_file() and (folder / "environment.json").is_file())


def read_run(path: str | Path, label: str | None = None) -> RunFiles:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{str(path)!r}: no such run directory. Pass folders `qlora-lab train` wrote (e.g. "
                        "outputs/2026-11-26/12-00-00); `qlora-lab runs` lists them.")
    if not is_run(folder) and not (folder / ".hydra" / "config.yaml").is_file():
        raise UserError(f"{str(path)!r} is not a run directory (it has neither config.yaml nor metrics.json); "
                        "`qlora-lab runs` lists the runs under a folder.")
    cfg_file = next((f for f in (folder / "config.yaml", folder / ".hydra" / "config.yaml") if f.is_file()), None)
    return RunFiles(folder, label or str(path).rstrip("/"), flatten(_load(cfg_file, {})),
                    _load(folder / "metrics.json", {}), _load(folder / "log_history.json", []))


def _load(path: Path | None, empty: Any) -> Any:
    """A JSON or YAML file's content; ``empty`` when it is missing or unreadable (a run killed while writing)."""
    if path is None or not path.is_file():
        return empty
    try:
        text = path.read_text(encoding="utf-8")
        return (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or empty
    except (OSError, ValueError, yaml.YAMLError):
        return empty


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"adapter.r": 16, ...} for a nested mapping; lists stay values."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree} if prefix else {}


UNSET = "(unset)"


def differing_settings(runs: list[RunFiles]) -> list[str]:
    """The setting keys whose values are not the same in every run (a key one run lacks counts as differing)."""
    keys = sorted(set().union(*(r.config for r in runs)))
    return [k for k in keys if not k.startswith(ALWAYS_DIFFERS)
            and len({json.dumps(r.config.get(k, UNSET), sort_keys=True, default=str) for r in runs}) > 1]


# --------------------------------------------------------------------------------------------------------------
# compare


def _num(v: Any, digits: int) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def _before_after(m: dict, before: str, after: str, digits: int) -> str:
    if m.get(before) is None and m.get(after) is None:
        return "–"
    return f"{_num(m.get(before), digits)} → {_num(m.get(after), digits)}"


def measures(r: RunFiles) -> dict[str, str]:
    """The numbers of one run, as table cells."""
    m = r.metrics
    return {
        "status": r.status,
        f"task score ({m.get('task_metric', 'task')}) before → after": _before_after(
            m, "task_score_before", "task_score_after", 3),
        "held-out eval loss before → after": _before_after(m, "eval_loss_before", "eval_loss", 4),
        "train loss": _num(m.get("train_loss"), 4),
        "tokens/s (non-padding)": _num(m.get("tokens_per_s"), 1),
        "peak memory (MiB)": _num(m.get("peak_mem_mb"), 0),
        "training time (s)": _num(m.get("train_runtime_s"), 1),
        "whole run (s)": _num(m.get("total_runtime_s"), 1),
        "steps": str(m.get("global_step", "–")),
    }


def _cell(v: Any) -> str:
    text = UNSET if v is UNSET else json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)
    return text.replace("|", "\\|")


def compare_table(runs: list[RunFiles]) -> str:
    """compare.md: the differing settings, then the measures, one column per run."""
    head = "| | " + " | ".join(f"`{r.label}`" for r in runs) + " |\n|---|" + "---|" * len(runs)
    differing = differing_settings(runs)
    lines = ["# Runs compared", "", "## Settings that differ", ""]
    if differing:
        lines.append(head.replace("| |", "| setting |", 1))
        lines += [f"| `{k}` | " + " | ".join(_cell(r.config.get(k, UNSET)) for r in runs) + " |" for k in differing]
    else:
        lines.append("None: the runs have the same settings (apart from their folders).")
    cells = [measures(r) for r in runs]
    lines += ["", "## Results", "", head.replace("| |", "| measure |", 1)]
    names = list(dict.fromkeys(k for c in cells for k in c))
    lines += [f"| {k} | " + " | ".join(c.get(k, "–") for c in cells) + " |" for k in names]
    return "\n".join(lines) + "\n"


def compare_figure(runs: list[RunFiles]):
    """compare.png: every run's loss curve, its held-out eval points marked (step 0: before training)."""
    from qlora_lab.report import _plt, draw_losses

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in runs:
        draw_losses(ax, r.history, label=r.label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("train loss (lines) and held-out eval loss (circles; step 0 = before training)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def compare(paths: list[str], out: str | Path = ".") -> dict[str, Any]:
    """Write <out>/compare.md and <out>/compare.png for the runs at ``paths``; return what was compared."""
    if len(paths) < 2:
        raise UserError("compare needs two or more run directories: qlora-lab compare RUN RUN [...]")
    runs = [read_run(p) for p in paths]
    if len({r.dir.resolve() for r in runs}) < len(runs):
        raise UserError("the same run directory is given twice; pass different runs.")
    out = Path(out).expanduser()
    table = compare_table(runs)
    write_text_atomic(out / "compare.md", table)
    from qlora_lab.report import save_figure

    save_figure(compare_figure(runs), out / "compare.png", dpi=100)
    return {"runs": runs, "differing": differing_settings(runs), "table": table,
            "files": [out / "compare.md", out / "compare.png"]}


def main(argv: list[str] | None = None) -> None:
    """`qlora-lab compare RUN RUN [...] [--out DIR]`."""
    ap = argparse.ArgumentParser(prog="qlora-lab compare", description="Compare runs: the settings that differ, "
                                 "their scores, losses, speed and memory (compare.md), and their loss curves "
                                 "(compare.png).")
    ap.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by `qlora-lab train`")
    ap.add_argument("--out", default=".", help="folder for compare.md and compare.png (default: the current one)")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = compare(a.runs, a.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    print(result["table"])
    print(f"Wrote {result['files'][0]} and {result['files'][1]}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------
# runs


def find_runs(root: str | Path) -> list[RunFiles]:
    """Every run directory under ``root`` (root included), newest first."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{str(root)!r}: no such folder.")
    found = []
    for folder, dirs, _ in os.walk(root):
        here = Path(folder)
        if is_run(here):
            found.append(read_run(here, label=os.path.relpath(here, root) if here != root else str(root)))
            dirs.clear()  # a run holds no other run
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
    return sorted(found, key=lambda r: r.modified, reverse=True)


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def run_row(r: RunFiles, now: float) -> dict[str, str]:
    c, m = r.config, r.metrics
    adapter = str(c.get("adapter.method", "?")) + (f" r={m.get('lora_r') or c.get('adapter.r')}" if c.get("adapter.method") not in
                                                   ("full", "prefix", "prompt", "ptuning", "ia3") else "")
    steps = m.get("global_step")
    max_steps = c.get("trainer.max_steps")
    return {
        "run": r.label,
        "status": r.status,
        "age": age(now - r.modified),
        "model": str(c.get("model.name_or_path", "?")).removeprefix("builtin:"),
        "quant": str(c.get("quant.method", "?")),
        "adapter": adapter,
        "lr": f"{c['trainer.learning_rate']:g}" if isinstance(c.get("trainer.learning_rate"), (int, float)) else "?",
        "steps": str(steps if steps is not None else "–") + (f"/{max_steps}" if isinstance(max_steps, int)
                                                            and max_steps > 0 else ""),
        "eval loss": _before_after(m, "eval_loss_before", "eval_loss", 3),
        "score": _before_after(m, "task_score_before", "task_score_after", 3),
    }


def runs_table(runs: list[RunFiles], now: float | None = None) -> str:
    """Aligned columns, one line per run."""
    now = time.time() if now is None else now
    rows = [run_row(r, now) for r in runs]
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols).rstrip()]
    lines += ["  ".join(r[c].ljust(width[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(lines)


def runs_main(argv: list[str] | None = None) -> None:
    """`qlora-lab runs [DIR]`."""
    ap = argparse.ArgumentParser(prog="qlora-lab runs", description="List the runs under a folder, newest first: "
                                 "status, age, key settings, eval loss and task score (before → after).")
    ap.add_argument("dir", nargs="?", default=".", help="where to look (default: the current folder)")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = find_runs(a.dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if not runs:
        print(f"No runs under {a.dir} (a run directory holds the config.yaml and metrics.json `qlora-lab train` "
              "writes).", file=sys.stderr)
        return
    print(runs_table(runs))
