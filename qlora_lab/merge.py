"""`qlora-lab merge`: fold a run's adapter into its base and save a standalone transformers model.

Reads the run's own config to know base model, quantization and adapter; never merges into 4-bit weights: the base
is reloaded in float32 (optionally with the exact NF4/FP4-dequantized weights the adapter was trained against),
merged in float32 by peft, cast to ``dtype`` and saved as safetensors with tokenizer, chat template, generation
config and a model card. After every merge it prints how closely the merged model reproduces the trained model
(base in training precision + adapter) on held-out prompts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from qlora_lab import models
from qlora_lab.config import CONF_DIR, MergeRunConfig, register_configs, unknown_key_problems
from qlora_lab.errors import ConfigError, UserError, exit_on_user_error
from qlora_lab.files import atomic_dir
from qlora_lab.runs import PROMPT_LEARNING, Run, compare_logits, heldout_prompts, load_run, load_trained

log = logging.getLogger(__name__)
BASES = ("auto", "original", "nf4_roundtrip")
SAVE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def merge(cfg: DictConfig) -> dict[str, Any]:
    """Merge ``cfg.run``'s adapter; write ``cfg.out`` (default <run>/merged); return the check numbers."""
    problems = unknown_key_problems(cfg, MergeRunConfig)
    if cfg.base not in BASES:
        problems.append(f"base={cfg.base!r}: use one of {', '.join(BASES)}.")
    if cfg.dtype not in SAVE_DTYPES:
        problems.append(f"dtype={cfg.dtype!r}: use one of {', '.join(SAVE_DTYPES)}.")
    if problems:
        raise ConfigError(problems)
    run = load_run(cfg.run)
    if run.method in PROMPT_LEARNING:
        raise UserError(f"run {run.dir} trained adapter={run.method}, which adds virtual tokens at inference instead "
                        "of changing weights, so there is nothing to merge. Serve it as is: "
                        f"`qlora-lab chat run={run.dir}`.")
    if run.method == "full":
        raise UserError(f"run {run.dir} was a full fine-tune: {run.adapter_dir} already is a standalone model, nothing "
                        f"to merge. Use it as is: qlora-lab chat run={run.adapter_dir}, or "
                        f"AutoModelForCausalLM.from_pretrained('{run.adapter_dir}').")
    four_bit = run.cfg.quant.method in ("nf4", "fp4")
    base = cfg.base if cfg.base != "auto" else ("nf4_roundtrip" if four_bit else "original")
    if base == "nf4_roundtrip" and not four_bit:
        raise UserError(f"base=nf4_roundtrip: run {run.dir} trained on quant={run.cfg.quant.method}, not a 4-bit "
                        "base, so there is no quantization to round-trip. Use base=original.")
    out = Path(cfg.out).expanduser() if cfg.out else run.dir / "merged"

    trained, tokenizer = load_trained(run)
    merged = merged_model(run, trained, base)
    merged.to(SAVE_DTYPES[cfg.dtype])
    check = compare_logits(trained, merged.eval(), tokenizer, heldout_prompts(run, cfg.check_prompts))
    log.info("Merged (base=%s, saved as %s) vs trained model (%s base + adapter) on %d held-out prompts: "
             "max |Δlogit| = %.4g, top-1 agreement = %.2f%%", base, cfg.dtype, run.cfg.quant.method, check["prompts"],
             check["max_abs_logit_delta"], 100 * check["top1_agreement"])

    info = {"run": str(run.dir), "base_model": run.cfg.model.name_or_path, "merge_base": base, "dtype": cfg.dtype,
            "train_quant": run.cfg.quant.method, "adapter": run.method, "check": check}
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(run, info))
    log.info("Wrote %s", out)
    return info


def merged_model(run: Run, trained, base: str):
    """float32 base (original or NF4/FP4 round-tripped) with the adapter merged in by peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = models.resolve_model_path(run.cfg.model.name_or_path)
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"},
                                                revision=run.cfg.model.revision,
                                                trust_remote_code=run.cfg.model.trust_remote_code)
    if base == "nf4_roundtrip":
        _copy_dequantized_base(trained, fp32)
    return PeftModel.from_pretrained(fp32, run.adapter_dir).merge_and_unload()


def _copy_dequantized_base(trained, fp32) -> None:
    """Overwrite each quantized layer of ``fp32`` with the dequantized weights of the trained 4-bit model.

    That is bit for bit what the 4-bit layers computed with in training (bitsandbytes dequantizes before its
    matmul), so the adapter is merged into the weights it actually learned against.
    """
    import bitsandbytes as bnb

    n = 0
    for name, module in trained.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        target = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        fp32.get_submodule(target).weight.data.copy_(weight.to(torch.float32).cpu())
        n += 1
    if n == 0:
        raise RuntimeError("no 4-bit layers found in the trained model")
    log.info("nf4_roundtrip: replaced %d layers with their dequantized training weights", n)


def model_card(run: Run, info: dict) -> str:
    m = run.metrics
    return "\n".join([
        "---", "library_name: transformers", "tags: [qlora-lab, merged, " + run.method + "]", "---", "",
        f"# Merged model from qlora-lab run `{run.dir.name}`", "",
        f"- base model: `{run.cfg.model.name_or_path}`",
        f"- adapter: `{run.method}` (r={run.cfg.adapter.r}, alpha={run.cfg.adapter.alpha}) trained on a "
        f"`{run.cfg.quant.method}` base",
        f"- data: `{run.cfg.data.source}`" + (f" (`{run.cfg.data.path}`)" if run.cfg.data.path else ""),
        f"- merge: base=`{info['merge_base']}`, merged in float32, saved as {info['dtype']}",
        f"- held-out task score of the trained run: {m.get('task_score_before')} → {m.get('task_score_after')} "
        f"({m.get('task_metric')})",
        f"- merged vs trained (base in training precision + adapter), {info['check']['prompts']} held-out prompts: "
        f"max |Δlogit| {info['check']['max_abs_logit_delta']}, top-1 agreement {info['check']['top1_agreement']:.2%}",
        "", "Load it with plain transformers: `AutoModelForCausalLM.from_pretrained(<this folder>)`.", "",
    ])


register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="merge")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    merge(cfg)
