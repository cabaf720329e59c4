"""Issue #20's GPU targets from one lent GPU session's bench outputs: the measured value, the plain recipe's value
from the same run, and the target, per target — benchmarks/results/gpu-targets-<card>-<date>.{json,md}.

    python benchmarks/gpu/targets.py --runs $OUT --out $OUT          # run_targets.sh calls it at the end

Reads what run_targets.sh's phases wrote in --runs (each optional; a phase that did not run is "not measured"):
  budget24.json  the matrix at seq 2048, batch 4, bench.memory_budget_gb=24 (both recipes capped at 24 GiB)
  maxseq24.json  bench.max_seq=true at batch 1, budget 24 GiB;  maxseq12.json  the same at 12 GiB
  mfu4096.json   the matrix at seq 4096, no budget (MFU, 4N FLOPs per token)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

TARGETS = {
    "speed_at_24gb": ("tokens/s vs the plain recipe, seq 2048, batch 4, both inside 24 GiB", 2.0, "budget24"),
    "longest_seq_at_24gb": ("longest trainable sequence at batch 1 inside 24 GiB (tokens)", 65536, "maxseq24"),
    "longest_seq_at_12gb": ("longest trainable sequence at batch 1 inside 12 GiB (tokens)", 16384, "maxseq12"),
    "mfu_seq4096": ("MFU at seq 4096, no budget (4N FLOPs per token)", 0.35, "mfu4096"),
}


def _matrix_rows(out: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]]]:
    """(qlora_lab's default row, the plain recipe's row, every completed qlora_lab variant row)."""
    rows = out["results"]
    ours = next((r for r in rows if r["recipe"] == "qlora_lab"), None)
    plain = next((r for r in rows if r["recipe"] == "plain"), None)
    variants = [r for r in rows if r["recipe"].startswith("qlora_lab:") and r["status"] == "completed"]
    return ours, plain, variants


def _status(row: dict[str, Any] | None) -> str:
    return "not run" if row is None else row["status"] if row["status"] != "failed" else f"failed: {row.get('error')}"


def speed(out: dict[str, Any]) -> dict[str, Any]:
    ours, plain, variants = _matrix_rows(out)
    result: dict[str, Any] = {"ours": _status(ours), "plain": _status(plain)}
    if plain and plain["status"] == "completed":
        result["plain_tokens_per_s"] = plain["tokens_per_s"]
        result["plain_peak_reserved_mb"] = plain.get("cuda_max_reserved_mb")
    if ours and ours["status"] == "completed":
        result["ours_tokens_per_s"] = ours["tokens_per_s"]
        result["ours_peak_reserved_mb"] = ours.get("cuda_max_reserved_mb")
    if "plain_tokens_per_s" in result:
        if "ours_tokens_per_s" in result:
            result["measured"] = round(result["ours_tokens_per_s"] / result["plain_tokens_per_s"], 2)
        result["variants"] = {r["recipe"]: round(r["tokens_per_s"] / result["plain_tokens_per_s"], 2) for r in variants}
    return result


def longest(out: dict[str, Any]) -> dict[str, Any]:
    found = {s["recipe"]: s for s in out["searches"]}
    ours, plain = found.get("qlora_lab"), found.get("plain")
    result: dict[str, Any] = {"measured": ours.get("max_seq") if ours else None,
                              "plain": plain.get("max_seq") if plain else None}
    result["stopped"] = {name: s.get("stopped") or s.get("note") for name, s in found.items()}
    result["variants"] = {name: s.get("max_seq") for name, s in found.items() if name.startswith("qlora_lab:")}
    return result


def mfu(out: dict[str, Any]) -> dict[str, Any]:
    ours, plain, variants = _matrix_rows(out)
    result: dict[str, Any] = {"ours": _status(ours), "plain": _status(plain)}
    if ours and ours["status"] == "completed":
        result["measured"] = ours["mfu"]
    if plain and plain["status"] == "completed":
        result["plain_mfu"] = plain["mfu"]
    result["variants"] = {r["recipe"]: r["mfu"] for r in variants}
    return result


def compose(runs: Path) -> dict[str, Any]:
    readers = {"budget24": speed, "maxseq24": longest, "maxseq12": longest, "mfu4096": mfu}
    targets, machine = {}, None
    for name, (what, target, phase) in TARGETS.items():
        path = runs / f"{phase}.json"
        entry: dict[str, Any] = {"what": what, "target": target, "source": path.name}
        if not path.is_file():
            entry.update(measured=None, met=None, note="not measured (the phase did not run or wrote nothing)")
        else:
            out = json.loads(path.read_text())
            machine = machine or out["machine"]
            entry.update(readers[phase](out))
            value = entry.get("measured")
            entry["met"] = value is not None and value >= target  # ran: a failure or nothing found is not met
        targets[name] = entry
    card = (machine or {}).get("gpu", "unknown-gpu")
    return {"card": card, "machine": machine, "date": dt.date.today().isoformat(), "targets": targets}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# Issue #20 GPU targets — {res['card']}, {res['date']}", "",
             "Llama-3.1-8B architecture (random weights), QLoRA NF4 r16 all-linear, one GPU; each value and the plain "
             "recipe's from the same run (benchmarks/gpu/run_targets.sh).", "",
             "| target | goal | ours | plain recipe | met | variants |", "|---|---|---|---|---|---|"]
    for name, t in res["targets"].items():
        plain = t.get("plain_tokens_per_s") or t.get("plain_mfu") or t.get("plain")
        met = {True: "yes", False: "no", None: "not measured"}[t["met"]]
        if t["met"] is False and t.get("measured") is None:
            met = "no (ran, no value: see the phase's log)"
        variants = ", ".join(f"{k.removeprefix('qlora_lab:')} {v}" for k, v in (t.get("variants") or {}).items())
        lines.append(f"| {t['what']} | {t['target']} | {t.get('measured')} | {plain} | {met} | {variants} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="the folder the phases wrote their JSON in")
    parser.add_argument("--out", type=Path, required=True, help="where gpu-targets-<card>-<date>.{json,md} go")
    args = parser.parse_args()
    res = compose(args.runs)
    name = f"gpu-targets-{res['card'].replace(' ', '-')}-{res['date']}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
