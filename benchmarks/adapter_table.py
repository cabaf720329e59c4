"""Trainable parameters and peak memory of every adapter x quantization on the embedded model.

Each configuration trains a few steps of the demo task in its own process (`python -m qlora_lab train ...`), so
peak RSS / CUDA memory is per configuration. Writes benchmarks/results/adapters-<machine>.{json,md}.

    python benchmarks/adapter_table.py                  # all rows, ~10 min on 2 CPU cores
    python benchmarks/adapter_table.py --steps 3 --only lora,dora
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = [  # (adapter, quant, extra overrides)
    ("lora", "nf4", []), ("lora", "none", []), ("lora", "fp4", []), ("lora", "int8", []),
    ("rslora", "nf4", []), ("dora", "nf4", []), ("pissa", "none", []), ("olora", "none", []),
    ("loftq", "nf4", []), ("prefix", "nf4", []), ("prompt", "nf4", []), ("ptuning", "nf4", []),
    ("ia3", "nf4", []), ("full", "none", []),
]


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-")
    import os
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def run_row(adapter: str, quant: str, extra: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "qlora_lab", "train", f"adapter={adapter}", f"quant={quant}",
                f"trainer.max_steps={steps}", "trainer.eval_strategy=no", "trainer.save_strategy=no",
                "score_before=false", "data.task_eval_samples=0", "trainer.logging_steps=1",
                f"hydra.run.dir={tmp}", *extra]
        t0 = time.time()
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        row = {"adapter": adapter, "quant": quant, "overrides": extra, "wall_s": round(time.time() - t0, 1)}
        if proc.returncode != 0:
            text = proc.stderr or proc.stdout
            err = text[text.find("error:"):] if "error:" in text else "\n".join(text.splitlines()[-3:])
            return {**row, "status": "refused" if proc.returncode == 2 else "failed", "error": " ".join(err.split())[:400]}
        m = json.loads((Path(tmp) / "metrics.json").read_text())
        keys = ("trainable_params", "total_params", "peak_mem_mb", "tokens_per_s", "train_loss", "device")
        return {**row, "status": "ok", **{k: m[k] for k in keys}}


def to_markdown(rows: list[dict], steps: int, name: str) -> str:
    lines = [f"Embedded SmolLM2-135M-Instruct, demo task, {steps} steps of batch 8, machine `{name}`; peak memory is the "
             "process's peak RSS on CPU (CUDA: max allocated), model loading included. Speed is not compared here "
             "(the tokens/s in the JSON come from 5 steps): see the bench harness.", "",
             "| adapter | quant | trainable params | % of total | peak memory (MiB) |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['adapter']} | {r['quant']} | {r['status']}: {r['error'][:140]} | | |")
            continue
        pct = 100 * r["trainable_params"] / r["total_params"]
        lines.append(f"| {r['adapter']} | {r['quant']} | {r['trainable_params']:,} | {pct:.3f} | "
                     f"{r['peak_mem_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated adapter names")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    rows = []
    for adapter, quant, extra in ROWS:
        if only and adapter not in only:
            continue
        row = run_row(adapter, quant, extra, a.steps)
        print(json.dumps(row), flush=True)
        rows.append(row)
    name = machine()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"adapters-{name}.json").write_text(json.dumps({"machine": name, "steps": a.steps, "rows": rows}, indent=1))
    (out / f"adapters-{name}.md").write_text(to_markdown(rows, a.steps, name))
    print(to_markdown(rows, a.steps, name))


if __name__ == "__main__":
    main()
