"""Where a CPU training process's resident memory comes from after loading the base model: anonymous memory (what
the process allocated) vs file-backed pages (the memory-mapped safetensors checkpoint).

    .venv/bin/python benchmarks/cpu_rss_breakdown.py [model] [--out benchmarks/results/rss-breakdown-<machine>.json]

Why: on CPU, `qlora-lab bench` and the budget planner read peak RSS above the imports, and the plan's estimate
(qlora_lab/estimate.py) counts the model's tensors only. transformers loads safetensors memory-mapped; the pages a
load reads stay mapped (and counted in RSS) while any tensor still views the file. Those pages are clean and the
kernel can drop them under pressure, so RSS overstates what the process holds. This prints each part after the
imports, after a 4-bit load (every linear layer in nf4 with double quantization, as bench's plain recipe loads it;
qlora-lab's own small-model rule would keep down_proj in 16-bit) and after a 16-bit load, each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")

CHILD = r"""
import json, re, sys, torch
def status():
    text = open("/proc/self/status").read()
    return {k: round(int(re.search(k + r":\s+(\d+)", text).group(1)) / 1024, 1) for k in %(fields)r}
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
import peft, trl  # the imports a training process has before it loads the model
from qlora_lab.models import resolve_model_path
path = resolve_model_path(sys.argv[1])
before = status()
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16) if sys.argv[2] == "nf4" else None
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quant)
after = status()
print(json.dumps({"after_imports": before, "after_load": after,
                  "model_bytes_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args()
    from qlora_lab.models import resolve_model_path

    checkpoint = sum(f.stat().st_size for f in Path(resolve_model_path(args.model)).glob("*.safetensors")) / 2**20
    rows = []
    for quant in ("nf4", "none"):
        proc = subprocess.run([sys.executable, "-c", CHILD % {"fields": FIELDS}, args.model, quant],
                              capture_output=True, text=True, check=True)
        row = {"quant": quant, **json.loads(proc.stdout.strip().splitlines()[-1])}
        grew = {k: round(row["after_load"][k] - row["after_imports"][k], 1) for k in FIELDS}
        row["load_added_mb"] = grew
        rows.append(row)
        print(f"quant={quant:<4}  load added: RSS {grew['VmRSS']:7.1f} MiB = anonymous {grew['RssAnon']:7.1f} + "
              f"file-backed {grew['RssFile']:7.1f}   (the model's tensors: {row['model_bytes_mb']:.1f} MiB; "
              f"checkpoint file: {checkpoint:.1f} MiB)")
    if args.out:
        args.out.write_text(json.dumps({"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                                        "model": args.model, "checkpoint_mb": round(checkpoint, 1), "rows": rows},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
