"""Reading finished run directories back: their config, and the trained model as it was trained."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from qlora_lab import adapters, models, plan
from qlora_lab.errors import UserError

PROMPT_LEARNING = ("prefix", "prompt", "ptuning")  # adapters that add virtual tokens instead of weight deltas


@dataclass
class Run:
    """A completed `qlora-lab train` run directory."""

    dir: Path
    cfg: DictConfig  # the run's config: config.yaml (written at its first start), else .hydra/config.yaml
    metrics: dict

    @property
    def adapter_dir(self) -> Path:
        return self.dir / "adapter"

    @property
    def method(self) -> str:
        return self.cfg.adapter.method


def load_run(path: str | Path) -> Run:
    """Open a run directory, or fail with what is missing and how to get it."""
    run_dir = Path(path).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run={str(path)!r}: no such run directory. Pass the folder a `qlora-lab train` run wrote "
                        "(e.g. run=outputs/2026-11-26/12-00-00).")
    # config.yaml: the config the run trained with (train() writes it once). .hydra/config.yaml is the latest
    # command's, which a refused rerun into the folder also rewrites; runs from before config.yaml existed have only it.
    cfg_file = next((f for f in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml") if f.is_file()),
                    run_dir / ".hydra" / "config.yaml")
    if not cfg_file.is_file():
        raise UserError(f"run={str(path)!r}: {cfg_file} is missing, so this is not a qlora-lab run directory.")
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    adapter_ok = any((run_dir / "adapter" / f).is_file() for f in ("adapter_config.json", "config.json"))
    if metrics.get("status") != "completed" or not adapter_ok:
        raise UserError(f"run={str(path)!r} is incomplete (no completed metrics.json and adapter/): it was interrupted "
                        "or failed. Resume it with the same `qlora-lab train ... hydra.run.dir=<run>` command first.")
    cfg = OmegaConf.load(cfg_file)
    return Run(run_dir, cfg, metrics)


def load_trained(run: Run):
    """(model, tokenizer): the base in the run's quantization with its adapter — the model as trained."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
    dtype, compute_dtype = plan.recorded_dtypes(run.dir, run.cfg)  # what it trained with, on whatever machine
    if run.method == "full":  # the adapter folder holds the whole fine-tuned model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(run.adapter_dir, dtype=models.resolve_dtype(dtype),
                                                     device_map=models.device_map())
        return model.eval(), tokenizer
    path = models.resolve_model_path(run.cfg.model.name_or_path)
    base = models.build_model(run.cfg.model, run.cfg.quant, path, dtype, compute_dtype,
                              plan.recorded_skip_modules(run.dir))
    # The adapter keeps the dtype it was trained and saved in (bf16 on a 4-bit base) instead of being upcast.
    model = PeftModel.from_pretrained(base, run.adapter_dir, autocast_adapter_dtype=run.cfg.quant.method == "none")
    adapters.fix_bnb_adapter_layers(model)  # IA3's output dtype, DoRA's int8 scales (see adapters.py)
    return model.eval(), tokenizer


def heldout_prompts(run: Run, n: int) -> list:
    """Up to ``n`` held-out prompts of the run's data (chat message lists); generic ones if the data is gone."""
    from qlora_lab import data

    try:
        held = data.load_splits(run.cfg.data).eval
        prompts = [r["prompt"] for r in data.task_rows(held, n)]
        if not prompts:  # plain-text data: its first texts
            prompts = [t for t in held.select(range(min(n, len(held))))[:]["text"] if t]
    except (UserError, OSError):
        prompts = []
    fallback = [[{"role": "user", "content": q}] for q in (
        "What is the capital of France?", "Write one sentence about the sea.",
        "List three prime numbers.", "Explain what a compiler does in one line.")]
    return (prompts or fallback)[:n]


def _token_ids(tokenizer, prompt) -> torch.Tensor:
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) \
        if isinstance(prompt, list) else prompt
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list) -> list[torch.Tensor]:
    """``model``'s float32 logits at every position of each prompt, on the CPU (prompt tokens x vocabulary each)."""
    return [model(input_ids=_token_ids(tokenizer, p).to(model.device)).logits.float().cpu() for p in prompts]


@torch.no_grad()
def compare_logits(reference: list[torch.Tensor], candidate, tokenizer, prompts: list) -> dict:
    """max |Δlogit| and top-1 agreement of ``candidate`` vs the ``reference`` logits (prompt_logits) of ``prompts``."""
    return logit_agreement(reference, [prompt_logits(candidate, tokenizer, [p])[0] for p in prompts])


def logit_agreement(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict:
    """max |Δlogit| and top-1 agreement of two lists of logits of the same prompts; ``flip_max_margin``: the widest
    lead of the reference's top-1 over its runner-up among the positions where the two disagree (0 when none do):
    small means the disagreements are near-ties of the reference."""
    max_delta, agree, total, flip_margin = 0.0, 0, 0, 0.0
    for a, b in zip(reference, candidate, strict=True):
        max_delta = max(max_delta, (a - b).abs().max().item())
        same = a.argmax(-1) == b.argmax(-1)
        agree += same.sum().item()
        total += a.shape[1]
        top2 = a.topk(2, dim=-1).values
        margins = (top2[..., 0] - top2[..., 1])[~same]
        flip_margin = max(flip_margin, margins.max().item() if margins.numel() else 0.0)
    return {"max_abs_logit_delta": round(max_delta, 5), "top1_agreement": round(agree / max(total, 1), 5),
            "positions": total, "prompts": len(reference), "flip_max_margin": round(flip_margin, 4)}
