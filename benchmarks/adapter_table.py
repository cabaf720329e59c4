"""Every adapter x quantization on the embedded model: parameters, peak memory and quality, one table.

Each row trains the demo task (`qlora-lab train`'s defaults: the demo data, learning rate 2e-4 with cosine decay,
batch 8, seed 42) for a fixed number of steps in its own process (`python -m qlora_lab train ...`), so peak RSS /
CUDA memory is per row, and records what that run's metrics.json says: trainable parameters, peak memory, the
held-out eval loss before (base model, adapter off) and after training, and the held-out task score (json_match,
greedy) before and after. Writes benchmarks/results/adapters-<machine>.{json,md}.

    python benchmarks/adapter_table.py                  # all 14 rows (see --help for the counts)
    python benchmarks/adapter_table.py --steps 3 --only lora,dora

Timings (wall_s, tokens_per_s) are kept in the JSON with the load average around each row and the row's CPU
seconds (cpu_s, user + system of its process: the work done, whoever else shares the cores): on a machine shared
with other work the wall times are not a speed comparison (the bench harness is).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ROWS = [  # (adapter, quant, extra overrides)
    ("lora", "nf4", []), ("lora", "none", []), ("lora", "fp4", []), ("lora", "int8", []),
    ("rslora", "nf4", []), ("dora", "nf4", []), ("pissa", "none", []), ("olora", "none", []),
    ("loftq", "nf4", []), ("prefix", "nf4", []), ("prompt", "nf4", []), ("ptuning", "nf4", []),
    ("ia3", "nf4", []), ("full", "none", []),
]
KEYS = ("trainable_params", "total_params", "peak_mem_mb", "tokens_per_s", "train_loss", "eval_loss_before",
        "eval_loss", "task_metric", "task_score_before", "task_score_after", "task_eval_samples", "eval_rows",
        "global_step", "skipped_updates", "train_runtime_s", "total_runtime_s", "device")


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _run(args: list[str], log: Path, timeout: int) -> tuple[int | None, float]:
    """Run ``args`` with its output in ``log``; (exit code or None when stopped at ``timeout``, its CPU seconds).

    The CPU seconds (user + system, from wait4) are the work the row did, whatever else shares the cores.
    """
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return (None if proc.returncode == -signal.SIGKILL else proc.returncode), cpu


def run_row(adapter: str, quant: str, extra: list[str], a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "qlora_lab", "train", f"adapter={adapter}", f"quant={quant}",
                f"trainer.max_steps={a.steps}", "trainer.eval_strategy=no", "trainer.save_strategy=no",
                "score_before=true", f"data.max_eval_samples={a.eval_samples}",
                f"data.task_eval_samples={a.task_samples}", "trainer.logging_steps=1", f"hydra.run.dir={tmp}", *extra]
        load_before, t0 = os.getloadavg()[0], time.time()
        code, cpu = _run(args, Path(tmp) / "out.log", a.timeout)
        row = {"adapter": adapter, "quant": quant, "overrides": extra, "wall_s": round(time.time() - t0, 1),
               "cpu_s": round(cpu, 1), "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
        if code is None:
            return {**row, "status": "failed", "error": f"timed out after {a.timeout} s (--timeout)"}
        if code != 0:
            text = (Path(tmp) / "out.log").read_text(errors="replace")
            err = text[text.find("error:"):] if "error:" in text else "\n".join(text.splitlines()[-3:])
            return {**row, "status": "refused" if code == 2 else "failed", "error": " ".join(err.split())[:400]}
        m = json.loads((Path(tmp) / "metrics.json").read_text())
        env = json.loads((Path(tmp) / "environment.json").read_text())
        trainer = yaml.safe_load((Path(tmp) / "config.yaml").read_text())["trainer"]
        return {**row, "status": "ok", **{k: m.get(k) for k in KEYS}, "allocator": env.get("allocator"),
                "learning_rate": trainer["learning_rate"], "batch": trainer["per_device_train_batch_size"]}


def _score(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def to_markdown(out: dict) -> str:
    rows, s = out["rows"], out["settings"]
    done = [r for r in rows if r["status"] == "ok"]
    before_zero = all(r.get("task_score_before") == 0 for r in done)
    metric = next((r["task_metric"] for r in done if r.get("task_metric")), "json_match")
    lrs = ", ".join(f"{x:g}" for x in sorted({r["learning_rate"] for r in done})) or "?"
    about = (f"Embedded SmolLM2-135M-Instruct, demo task with `qlora-lab train`'s defaults (learning rate {lrs}, "
             f"cosine, batch 8, seed 42), {s['steps']} steps, each row in its own process; machine "
             f"`{out['machine']}`, {out['date']}, commit {out['commit']}. Peak memory: the process's peak RSS on "
             "CPU (CUDA: max allocated), model loading, evaluation and generation included. Eval loss: held-out "
             f"loss on {s['eval_samples']} rows, before = the base model (adapter off). {metric}: greedy answers to "
             f"{s['task_samples']} held-out rows"
             + (", 0.000 before training for every row." if before_zero else "; before → after.")
             + " Speed is not compared here (see the bench harness).")
    header = ("| adapter | quant | trainable params | % of total | peak memory (MiB) | eval loss before → after | "
              f"{metric} |")
    lines = [about, "", header, "|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        if r["status"] != "ok":
            why = r["error"].split(" - ", 1)[-1].split(". ")[0][:160]  # the problem itself, without the list's head
            lines.append(f"| {r['adapter']} | {r['quant']} | {r['status']}: {why} | | | | |")
            continue
        pct = 100 * r["trainable_params"] / r["total_params"]
        task = _score(r["task_score_after"]) if before_zero else \
            f"{_score(r['task_score_before'])} → {_score(r['task_score_after'])}"
        lines.append(f"| {r['adapter']} | {r['quant']} | {r['trainable_params']:,} | {pct:.3f} | "
                     f"{r['peak_mem_mb']:.0f} | {r['eval_loss_before']:.4f} → {r['eval_loss']:.4f} | {task} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per row (the demo's own run: 50)")
    ap.add_argument("--eval-samples", type=int, default=48, help="held-out rows for the eval loss (demo: 48)")
    ap.add_argument("--task-samples", type=int, default=48, help="held-out rows the task score generates for (demo: 48)")
    ap.add_argument("--only", default="", help="comma-separated adapter names")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds before a row is stopped (recorded as failed)")
    ap.add_argument("--jobs", type=int, default=1, help="rows run at once, each in its own process (peak memory "
                    "and scores are per process; wall times then share the cores)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    name = machine()
    out = {"machine": name, "date": dt.date.today().isoformat(), "commit": _git("rev-parse", "--short", "HEAD"),
           "dirty": bool(_git("status", "--porcelain")), "cpu_count": os.cpu_count(),
           "settings": {"steps": a.steps, "eval_samples": a.eval_samples, "task_samples": a.task_samples,
                        "jobs": a.jobs},
           "rows": []}
    t0 = time.time()
    todo = [r for r in ROWS if not only or r[0] in only]

    def one(spec: tuple) -> dict:
        row = run_row(*spec, a)
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # each row is its own process either way
        out["rows"] = list(pool.map(one, todo))
    out["total_wall_s"] = round(time.time() - t0, 1)
    out["total_cpu_s"] = round(sum(r.get("cpu_s", 0) for r in out["rows"]), 1)
    folder = Path(a.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"adapters-{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    (folder / f"adapters-{name}.md").write_text(to_markdown(out))
    print(to_markdown(out))


if __name__ == "__main__":
    main()
