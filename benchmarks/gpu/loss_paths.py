"""GPU: tokens/s and peak memory of QLoRA with TRL's fused LM-head loss vs the model's own loss (loss=fused/native).

Builds an architecture-only model (random weights) shaped like Llama-3.2-1B but with SmolLM2's 49k vocabulary (the
tokenizer at hand), then trains the demo task for a few steps with each loss path, each in its own process.
    python benchmarks/gpu/loss_paths.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_model(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_lab.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-random"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True,
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama-3.2-1b-shape"
        build_model(model_dir)
        for loss in ("fused", "native"):
            run = Path(tmp) / f"run-{loss}"
            cmd = [sys.executable, "-m", "qlora_lab", "train", f"model.name_or_path={model_dir}", f"loss={loss}",
                   f"trainer.max_steps={a.steps}", f"trainer.per_device_train_batch_size={a.batch}",
                   "trainer.eval_strategy=no", "trainer.save_strategy=no", "score_before=false",
                   "data.task_eval_samples=0", "data.max_train_samples=2000", f"hydra.run.dir={run}"]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                rows.append({"loss": loss, "status": "failed", "error": proc.stderr[-1500:]})
                continue
            m = json.loads((run / "metrics.json").read_text())
            rows.append({"loss": loss, "status": "ok", **{k: m[k] for k in (
                "tokens_per_s", "peak_mem_mb", "train_loss", "train_runtime_s", "trainable_params", "total_params")}})
            print(json.dumps(rows[-1]), flush=True)
    Path(a.out).write_text(json.dumps({"model": "llama-3.2-1b-shape (vocab 49152, random weights)", "steps": a.steps,
                                       "batch": a.batch, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
