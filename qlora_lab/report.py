"""Reports: a run's report.md and loss curve, and the sweep report at a multirun root.

`qlora-lab report <sweep dir>` (also written automatically when a multirun ends, by :class:`SweepReportCallback`)
reads every job directory's overrides, status and metrics and writes, at the sweep root:
``sweep_report.csv``, ``sweep_report.md`` (with the best run named) and ``sweep_report.png`` (the objective against
each swept parameter, and the jobs' loss curves).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from qlora_lab.files import write_text_atomic

log = logging.getLogger(__name__)
OBJECTIVE = "eval_loss"
METRIC_COLUMNS = ("eval_loss", "train_loss", "task_score_before", "task_score_after", "tokens_per_s", "peak_mem_mb",
                  "train_runtime_s", "global_step")
# a held-out prompt longer than this is shown cut in the middle in report.md (the demo's prompts, ~200, stay whole)
PROMPT_CHARS = 320


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def run_report(cfg, m: dict[str, Any]) -> str:
    """A run's report.md: what was trained, before → after on the held-out data, time and memory."""
    before, after = m.get("task_score_before"), m.get("task_score_after")
    lines = [
        "# qlora_lab run report",
        "",
        f"- objective: `{m.get('objective', 'sft')}`" + (f" (continuing `{m['init_from']}`)" if m.get("init_from")
                                                        else ""),
        f"- model: `{cfg.model.name_or_path}` · quant: `{cfg.quant.method}` · adapter: `{cfg.adapter.method}` "
        f"(r={m.get('lora_r') or cfg.adapter.r}, alpha={m.get('lora_alpha') or cfg.adapter.alpha}) · data: "
        f"`{cfg.data.source}`"
        + (f" (`{cfg.data.path}`)" if cfg.data.path else ""),
        (f"- trainable parameters: {m['trainable_params']:,} of {m['total_params']:,} "
         f"({100 * m['trainable_params'] / m['total_params']:.2f}%)"),
        f"- steps: {m['global_step']} · train rows: {m['train_rows']} · held-out rows: {m['eval_rows']}"
        + (f" · resumed from `{m['resumed_from']}`" if m.get("resumed_from") else ""),
        "",
        "| measure | before | after |",
        "|---|---|---|",
        f"| held-out task score ({m['task_metric']}, n={m['task_eval_samples']}) | {_fmt(before, 3)} | {_fmt(after, 3)} |",
        f"| held-out eval loss | {_fmt(m.get('eval_loss_before'))} | {_fmt(m['eval_loss'])} |",
        *_preference_rows(m),
        "",
        (f"- train loss: {_fmt(m['train_loss'])} · training time: {m['train_runtime_s']:.1f} s "
         f"(whole run {m['total_runtime_s']:.1f} s) · {m['tokens_per_s']} tokens/s (non-padding) on {m['device']}"),
        f"- peak memory: {m['peak_mem_mb']:.0f} MiB ({'CUDA allocated' if m['device'] == 'cuda' else 'process RSS'})",
    ]
    if m.get("skipped_updates"):
        lines.append(f"- {m['skipped_updates']} optimizer step(s) skipped for non-finite gradients")
    lines += _eval_lines(m, (cfg.get("early_stopping") or {}).get("patience"))
    if m.get("examples"):
        lines += ["", "## Held-out examples (after training)", ""]
        for ex in m["examples"]:
            lines += [f"- prompt (the user's message): {json.dumps(middle_cut(ex['prompt']), ensure_ascii=False)}",
                      f"  - answer: `{ex['answer']}` ({'correct' if ex['ok'] else 'wrong'})",
                      f"  - reference: `{ex['reference']}`"]
    return "\n".join(lines) + "\n"


def _preference_rows(m: dict[str, Any]) -> list[str]:
    """report.md's before/after rows of a preference objective (objectives.py)."""
    if m.get("objective") in (None, "sft"):
        return []
    rows = [("held-out preference accuracy (log p(chosen) > log p(rejected))", "preference_accuracy"),
            (f"held-out reward accuracy ({m['objective']}, vs the reference)", "reward_accuracy"),
            ("held-out reward margin", "reward_margin")]
    return [f"| {label} | {_fmt(m.get(key + '_before'), 3)} | {_fmt(m.get(key + '_after'), 3)} |"
            for label, key in rows if m.get(key + "_after") is not None or m.get(key + "_before") is not None]


def eval_curve(log_history: list[dict], metric: str = "eval_loss") -> list[dict[str, Any]]:
    """The held-out evaluations of a Trainer log history, in order: {"step", "eval_loss"[, metric]} each."""
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    return [{"step": e["step"], "eval_loss": e["eval_loss"], **({key: e[key]} if key in e else {})}
            for e in log_history if "eval_loss" in e and "step" in e]


def _eval_lines(m: dict[str, Any], patience: Any = None) -> list[str]:
    """report.md's table of the evaluations during training, the kept one marked."""
    curve = m.get("eval_curve") or []
    if not curve:
        return []
    keys = list(dict.fromkeys(k for point in curve for k in point if k != "step"))
    best = m.get("best_step")
    lines = ["", "## Held-out evaluations during training", "",
             f"adapter/ holds the {'best evaluated checkpoint' if m.get('keep') == 'best' else 'last step'}"
             + (f" (step {best})" if m.get("keep") == "best" and best is not None else "")
             + ("; training stopped early: no improvement for "
                f"{patience} evaluation(s)" if m.get("stopped_early") else "") + ".",
             "", "| step | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for point in curve:
        mark = " (kept)" if m.get("keep") == "best" and point["step"] == best else ""
        lines.append(f"| {point['step']}{mark} | " + " | ".join(_fmt(point.get(k)) for k in keys) + " |")
    return lines


def middle_cut(text: str, limit: int = PROMPT_CHARS) -> str:
    """``text`` whole if it has at most ``limit`` characters, else its beginning and end around an ellipsis: an
    instruction's first words and the input at its end both stay readable."""
    if len(text) <= limit:
        return text
    head = (limit - 3) * 3 // 5
    return f"{text[:head].rstrip()} … {text[len(text) - (limit - 3 - head):].lstrip()}"


def loss_points(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train loss points, held-out eval loss points) of a Trainer log history, as (step, loss).

    The eval points start with the base model's loss before training (``before_loss`` at step 0: train() evaluates
    it with the adapter off, see train.EvalBeforeTraining) when the history has it, so that the curve shows the gain
    from the start."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e[k]) for e in log_history for k in ("before_loss", "eval_loss") if k in e and "step" in e]
    return train, sorted(evals, key=lambda p: p[0])


def draw_losses(ax, log_history: list[dict], label: str = "", color=None, eval_color=None, best: bool = False) -> None:
    """A run's train loss as a line and its held-out eval points as circles (step 0: before training) on ``ax``,
    both in ``color`` (the axes' next colour by default) unless ``eval_color`` is given.

    A series of one point gets a marker (a line through a single point draws nothing); ``best`` draws it thicker."""
    train, evals = loss_points(log_history)
    width = 2.6 if best else 1.4
    if train:
        line, = ax.plot(*zip(*train), marker="o" if len(train) == 1 else None, lw=width, color=color,
                        label=f"{label} train loss".strip())
        color = line.get_color()
    if evals:
        ax.plot(*zip(*evals), "o--", color=eval_color or color, lw=width * 0.6, ms=6 if best else 4,
                label=f"{label} held-out eval loss".strip())


def loss_figure(log_history: list[dict], title: str = ""):
    """The figure of loss.png: train and held-out eval loss against the step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    draw_losses(ax, log_history, color="C0", eval_color="C1")
    _, evals = loss_points(log_history)
    if evals and evals[0][0] == 0:
        ax.annotate("before training", evals[0], textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    return fig


def loss_curve_png(log_history: list[dict], path: Path, title: str = "") -> None:
    """Plot train and held-out eval loss (from step 0, before training) against the step into ``path``."""
    save_figure(loss_figure(log_history, title), path, dpi=100)


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)


# --------------------------------------------------------------------------------------------------------------
# sweeps


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory under ``sweep_dir`` (those holding .hydra/overrides.yaml)."""
    rows = []
    for job in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=lambda p: _job_key(p.parent.parent)):
        job_dir = job.parent.parent
        overrides = yaml.safe_load(job.read_text()) or []
        params = dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith("hydra"))
        metrics_file = job_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        status = metrics.get("status", "incomplete")
        row = {"job": job_dir.name, "status": status, **{f"param:{k}": v for k, v in params.items()}}
        row.update({k: metrics.get(k) for k in METRIC_COLUMNS})
        if status == "failed":
            row["error"] = str(metrics.get("error", ""))[:300]
        rows.append(row)
    return rows


def _job_key(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def write_report(sweep_dir: str | Path, objective: str = OBJECTIVE, mode: str = "min") -> dict[str, Any]:
    """Write sweep_report.{csv,md,png} at ``sweep_dir``; return {"jobs": n, "best": row or None, ...}."""
    sweep_dir = Path(sweep_dir)
    rows = collect_jobs(sweep_dir)
    if not rows:
        from qlora_lab.errors import UserError

        raise UserError(f"{sweep_dir}: no job directories (with .hydra/overrides.yaml) found. Pass the folder a "
                        "multirun wrote, e.g. multirun/2026-11-26/12-00-00.")
    done = [r for r in rows if r["status"] == "completed" and _finite(r.get(objective))]
    best = (min if mode == "min" else max)(done, key=lambda r: r[objective]) if done else None
    columns = list(dict.fromkeys(k for r in rows for k in r))

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(sweep_dir / "sweep_report.csv", buf.getvalue())

    all_params = [c for c in columns if c.startswith("param:")]
    # the swept parameters: those whose value differs between jobs; the rest are the sweep's common overrides
    params = [c for c in all_params if len({str(r.get(c)) for r in rows}) > 1] or all_params
    common = [c for c in all_params if c not in params]
    shown = ["job", "status", *params, *[c for c in METRIC_COLUMNS if any(r.get(c) is not None for r in rows)]]
    md = [f"# Sweep report: `{sweep_dir}`", "",
          f"{len(rows)} jobs: {sum(r['status'] == 'completed' for r in rows)} completed, "
          f"{sum(r['status'] == 'failed' for r in rows)} failed, "
          f"{sum(r['status'] not in ('completed', 'failed') for r in rows)} incomplete."
          + (" Common overrides: " + ", ".join(f"`{c[6:]}={rows[0][c]}`" for c in common) + "." if common else ""),
          ""]
    if best:
        md += [f"**Best run** ({mode} {objective} = {best[objective]:.4f}): job `{best['job']}` — "
               + ", ".join(f"{p[6:]}={best[p]}" for p in params), ""]
    md += ["| " + " | ".join(c.removeprefix("param:") for c in shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        md.append("| " + " | ".join(_cell(r.get(c)) for c in shown) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        md += ["", "## Failed jobs", ""] + [f"- job `{r['job']}`: {r.get('error', '')}" for r in failed]
    write_text_atomic(sweep_dir / "sweep_report.md", "\n".join(md) + "\n")
    _plot_sweep(sweep_dir, rows, params, objective, best)
    log.info("Sweep report: %s (%d jobs, best: %s)", sweep_dir / "sweep_report.md", len(rows),
             best["job"] if best else "none")
    return {"jobs": len(rows), "best": best, "rows": rows}


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _plot_sweep(sweep_dir: Path, rows: list[dict], params: list[str], objective: str, best: dict | None) -> None:
    save_figure(sweep_figure(sweep_dir, rows, params, objective, best), sweep_dir / "sweep_report.png", dpi=90)


def sweep_figure(sweep_dir: Path, rows: list[dict], params: list[str], objective: str, best: dict | None = None):
    """The objective against each swept parameter (a log axis for parameters swept on a log scale, the best job a
    star), and every job's train loss curve (the best job's drawn thicker)."""
    plt = _plt()
    n = len(params) + 1
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.8), squeeze=False)
    log_params = log_scale_params(sweep_dir, rows, params)
    done = [r for r in rows if r["status"] == "completed" and _finite(r.get(objective))]
    for ax, p in zip(axes[0], params):
        xs = [_num(r[p]) for r in done]
        numeric = all(isinstance(x, float) for x in xs)
        ax.scatter(xs if numeric else [str(x) for x in xs], [r[objective] for r in done], label="jobs")
        if best is not None:
            ax.scatter([_num(best[p]) if numeric else str(best[p])], [best[objective]], marker="*", s=220,
                       color="crimson", zorder=3, label=f"best: job {best['job']}")
            ax.legend(fontsize=7)
        if p in log_params:
            ax.set_xscale("log")
        ax.set_xlabel(p.removeprefix("param:") + (" (log scale)" if p in log_params else ""))
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    for r in rows:
        hist = sweep_dir / r["job"] / "log_history.json"
        if not hist.is_file():
            continue
        train, _ = loss_points(json.loads(hist.read_text()))
        is_best = best is not None and r["job"] == best["job"]
        if train:  # one logged point gets a marker: a line through a single point draws nothing
            ax.plot(*zip(*train), marker="o" if len(train) == 1 else None, lw=2.6 if is_best else 1.2,
                    zorder=3 if is_best else 2, label=f"job {r['job']}" + (" (best)" if is_best else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("loss curves")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def log_scale_params(sweep_dir: Path, rows: list[dict], params: list[str]) -> set[str]:
    """The swept parameters drawn on a log axis: numeric, positive, and either sampled on a log scale by the sweep
    (an Optuna ``tag(log, ...)`` in the sweep's multirun.yaml) or spanning a factor of 10 or more (a grid such as
    1e-4,1e-3,1e-2, which a linear axis crowds into one corner but for its largest value)."""
    tagged: set[str] = set()
    multirun = sweep_dir / "multirun.yaml"
    if multirun.is_file():
        try:
            hydra_cfg = (yaml.safe_load(multirun.read_text()) or {}).get("hydra") or {}
        except yaml.YAMLError:
            hydra_cfg = {}
        swept = (hydra_cfg.get("sweeper") or {}).get("params") or {}
        tagged = {f"param:{k}" for k, v in swept.items() if str(v).replace(" ", "").startswith("tag(log")}
    out = set()
    for p in params:
        values = [_num(r.get(p)) for r in rows if r.get(p) is not None]
        if not values or not all(isinstance(v, float) for v in values) or min(values) <= 0:
            continue
        if p in tagged or max(values) / min(values) >= 10:
            out.add(p)
    return out


def _num(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return x


class SweepReportCallback(Callback):
    """Hydra callback: write the sweep report when a multirun ends (conf/train.yaml registers it)."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        try:
            write_report(config.hydra.sweep.dir)
        except Exception as e:  # noqa: BLE001 - a report problem must not turn a finished sweep into a failure
            log.warning("Could not write the sweep report: %s", e)


def main(argv: list[str] | None = None) -> None:
    """`qlora-lab report <sweep dir> [--objective eval_loss] [--mode min]`."""
    from qlora_lab.errors import UserError

    ap = argparse.ArgumentParser(prog="qlora-lab report", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--objective", default=OBJECTIVE)
    ap.add_argument("--mode", choices=("min", "max"), default="min")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = write_report(a.sweep_dir, a.objective, a.mode)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print((Path(a.sweep_dir) / "sweep_report.md").read_text())
    if out["best"] is None:
        sys.exit(1)
