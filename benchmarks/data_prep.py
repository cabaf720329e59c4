"""Data preparation at scale: qlora_lab's cached pipeline vs the plain `datasets` recipe, side by side.

    python benchmarks/data_prep.py [--rows 1000 100000 1000000] [--name NAME]

For each size, a JSON Lines file of generated chat rows (the demo task's ~120-token conversations, a system turn in
some) is prepared, each measurement in a fresh process:
- plain: ``datasets.load_dataset("json") + .map(tokenizer.apply_chat_template(tokenize=True), batched=True,
  num_proc=<cores>)`` — what a hand-written script does, with no loss mask (it would train on the prompts too);
- qlora_lab first: ``prepare.prepare`` on an empty cache (read, check, convert, hold out, render, mask, tokenize,
  write the cache);
- qlora_lab cached: the same call again (what a second run or every sweep job pays).
It records seconds and the peak RSS of the process (VmHWM) and of its worker processes (RUSAGE_CHILDREN), and writes
benchmarks/results/<name>.{json,md}. The targets (issue #14): first run <= 1.5x plain, peak RSS growth from 1k to
1M rows <= 500 MiB, cached rerun <= 10% of the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "builtin:smollm2-135m-instruct"


def write_rows(path: Path, n: int) -> None:
    sys.path.insert(0, str(ROOT))
    from qlora_lab import task

    base = task.demo_rows(5000, "train", 0)
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            row = base[i % len(base)]
            messages = [{"role": "user", "content": f"{row['prompt']} (#{i})"},
                        {"role": "assistant", "content": row["completion"]}]
            if rng.random() < 0.3:
                messages.insert(0, {"role": "system", "content": "You extract facts as JSON."})
            f.write(json.dumps({"messages": messages}) + "\n")


def peak_rss_mb() -> tuple[float, float]:
    own = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            own = int(line.split()[1]) / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(own, 1), round(children, 1)


def child(mode: str, path: str) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from omegaconf import OmegaConf

    from qlora_lab import models

    tokenizer = models.build_tokenizer(OmegaConf.create({"revision": None, "trust_remote_code": False}),
                                       models.resolve_model_path(MODEL))
    # imports and config composition before the clock: both pipelines are timed from reading the file on
    from datasets import load_dataset
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from qlora_lab import prepare
    from qlora_lab.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=file", f"data.path={path}"])
    with open_dict(cfg):
        cfg.output_dir = "/nonexistent"
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the tokenizer is loaded in both
    started = time.time()
    if mode == "plain":
        ds = load_dataset("json", data_files=path, split="train", cache_dir=os.environ["BENCH_HF_CACHE"])
        procs = (os.cpu_count() or 1) if len(ds) >= 20_000 else None
        ds = ds.map(lambda b: tokenizer.apply_chat_template(b["messages"], tokenize=True, return_dict=True),
                    batched=True, num_proc=procs, remove_columns=["messages"])
        rows, tokens = len(ds), None
    else:
        prepared = prepare.prepare(cfg, tokenizer)
        rows = len(prepared.train) + len(prepared.eval)
        tokens = prepared.stats["train_tokens"]
    seconds = time.time() - started
    own, children = peak_rss_mb()
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": own, "workers_peak_rss_mb": children,
                      "rows": rows, "train_tokens": tokens}))


def measure(mode: str, path: Path, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "_child", mode, str(path)], env=env, capture_output=True,
                          text=True, timeout=7200)
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    ap.add_argument("--name", default=f"data-prep-cpu-{os.cpu_count()}core-{platform.machine()}")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qlora-lab-data-bench-"))
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
               "command": "python benchmarks/data_prep.py " + " ".join(sys.argv[1:]), "sizes": []}
    try:
        for n in args.rows:
            path = work / f"rows-{n}.jsonl"
            write_rows(path, n)
            env = {**os.environ, "QLORA_LAB_DATA_CACHE": str(work / f"cache-{n}"),
                   "BENCH_HF_CACHE": str(work / f"hf-{n}")}
            row = {"rows": n, "file_mb": round(path.stat().st_size / 2**20, 1)}
            row["plain"] = measure("plain", path, env)
            row["qlora_lab_first"] = measure("ours", path, env)
            row["qlora_lab_cached"] = measure("ours", path, env)
            row["first_vs_plain"] = round(row["qlora_lab_first"]["seconds"] / row["plain"]["seconds"], 3)
            row["cached_vs_first"] = round(row["qlora_lab_cached"]["seconds"] / row["qlora_lab_first"]["seconds"], 3)
            results["sizes"].append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work / f"hf-{n}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sizes = results["sizes"]
    if len(sizes) > 1:
        results["peak_rss_growth_mb"] = round(sizes[-1]["qlora_lab_first"]["peak_rss_mb"]
                                              - sizes[0]["qlora_lab_first"]["peak_rss_mb"], 1)
    out = ROOT / "benchmarks" / "results" / args.name
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Data preparation: qlora_lab vs plain datasets ({results['machine']}, {results['date']})", "",
             f"`{results['command']}` — each cell a fresh process; RSS = the process's peak (VmHWM), workers' peak "
             "in brackets.", "",
             "| rows | file MB | plain s | qlora_lab first s | cached s | first / plain | cached / first | "
             "plain RSS MiB | first RSS MiB | cached RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sizes:
        p, f, c = r["plain"], r["qlora_lab_first"], r["qlora_lab_cached"]
        lines.append(f"| {r['rows']:,} | {r['file_mb']} | {p['seconds']} | {f['seconds']} | {c['seconds']} | "
                     f"{r['first_vs_plain']}x | {r['cached_vs_first']}x | {p['peak_rss_mb']} "
                     f"({p['workers_peak_rss_mb']}) | {f['peak_rss_mb']} ({f['workers_peak_rss_mb']}) | "
                     f"{c['peak_rss_mb']} |")
    if "peak_rss_growth_mb" in results:
        lines += ["", f"Peak RSS growth of the first run from {sizes[0]['rows']:,} to {sizes[-1]['rows']:,} rows: "
                  f"{results['peak_rss_growth_mb']} MiB."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"written: {out}.json / .md")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
