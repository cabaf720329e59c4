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
        f"- model: `{cfg.model.name_or_path}` · quant: `{cfg.quant.method}` · adapter: `{cfg.adapter.method}` "
        f"(r={cfg.adapter.r}, alpha={cfg.adapter.alpha}) · data: `{cfg.data.source}`"
        + (f" (`{cfg.data.path}`)" if cfg.data.path else ""),
        f"- trainable parameters: {m['trainable_params']:,} of {m['total_params']:,} "
        f"({100 * m['trainable_params'] / m['total_params']:.2f}%)",
        f"- steps: {m['global_step']} · train rows: {m['train_rows']} · held-out rows: {m['eval_rows']}"
        + (f" · resumed from `{m['resumed_from']}`" if m.get("resumed_from") else ""),
        "",
        "| measure | before | after |",
        "|---|---|---|",
        f"| held-out task score ({m['task_metric']}, n={m['task_eval_samples']}) | {_fmt(before, 3)} | {_fmt(after, 3)} |",
        f"| held-out eval loss | {_fmt(m.get('eval_loss_before'))} | {_fmt(m['eval_loss'])} |",
        "",
        f"- train loss: {_fmt(m['train_loss'])} · training time: {m['train_runtime_s']:.1f} s "
        f"(whole run {m['total_runtime_s']:.1f} s) · {m['tokens_per_s']} tokens/s (non-padding) on {m['device']}",
        f"- peak memory: {m['peak_mem_mb']:.0f} MiB ({'CUDA allocated' if m['device'] == 'cuda' else 'process RSS'})",
    ]
    if m.get("skipped_updates"):
        lines.append(f"- {m['skipped_updates']} optimizer step(s) skipped for non-finite gradients")
    if m.get("examples"):
        lines += ["", "## Held-out examples (after training)", ""]
        for ex in m["examples"]:
            lines += [f"- prompt: {ex['prompt'][-160:]!r}", f"  - answer: `{ex['answer']}` "
                      f"({'correct' if ex['ok'] else 'expected `' + ex['reference'] + '`'})"]
    return "\n".join(lines) + "\n"


def loss_curve_png(log_history: list[dict], path: Path, title: str = "") -> None:
    """Plot train (and eval) loss against the step from a Trainer's log history."""
    plt = _plt()
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    _plot_sweep(sweep_dir, rows, params, objective)
    log.info("Sweep report: %s (%d jobs, best: %s)", sweep_dir / "sweep_report.md", len(rows),
             best["job"] if best else "none")
    return {"jobs": len(rows), "best": best, "rows": rows}


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _plot_sweep(sweep_dir: Path, rows: list[dict], params: list[str], objective: str) -> None:
    plt = _plt()
    n = len(params) + 1
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.8), squeeze=False)
    for ax, p in zip(axes[0], params):
        pts = [(r[p], r[objective]) for r in rows if r["status"] == "completed" and _finite(r.get(objective))]
        xs = [_num(x) for x, _ in pts]
        ax.scatter(xs if all(isinstance(x, float) for x in xs) else [str(x) for x, _ in pts], [y for _, y in pts])
        ax.set_xlabel(p.removeprefix("param:"))
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    for r in rows:
        hist = sweep_dir / r["job"] / "log_history.json"
        if hist.is_file():
            h = json.loads(hist.read_text())
            pts = [(e["step"], e["loss"]) for e in h if "loss" in e and "step" in e]
            if pts:
                ax.plot(*zip(*pts), label=f"job {r['job']}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("loss curves")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(sweep_dir / "sweep_report.png", dpi=90)
    plt.close(fig)


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
