"""`qlora-lab merge`: fold a run's adapter into its base and save a standalone transformers model.

Reads the run's own config to know base model, quantization and adapter; never merges into 4-bit weights: the base
is reloaded in float32 (or the 4-bit base of the run dequantized: the exact weights the adapter was trained against),
merged in float32 by peft, cast to ``dtype`` and saved as safetensors with tokenizer, chat template, generation
config and a model card. After every merge it prints how closely the merged model reproduces the trained model
(base in training precision + adapter) on held-out prompts. The trained model's logits on those prompts are taken
first, so that one model is in memory at a time (the trained one, then the float32 one; the logits cost prompt
tokens x vocabulary x 4 bytes).
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from qlora_lab import models
from qlora_lab.config import CONF_DIR, MergeRunConfig, register_configs
from qlora_lab.errors import ConfigError, UserError, exit_on_user_error
from qlora_lab.files import atomic_dir
from qlora_lab.runs import PROMPT_LEARNING, Run, compare_logits, heldout_prompts, load_run, load_trained, prompt_logits
from qlora_lab.validate import unknown_key_problems

log = logging.getLogger(__name__)
BASES = ("auto", "original", "nf4_roundtrip")
SAVE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def merge(cfg: DictConfig) -> dict[str, Any]:
    """Merge ``cfg.run``'s adapter; write ``cfg.out`` (default <run>/merged); return the check numbers.

    ``base=auto`` on a 4-bit run with a held-out task metric merges into both bases, scores each merged model on
    the run's held-out rows (task score and eval loss) and keeps the better one (ties: the one that reproduces the
    trained model best): an adapter trained against the 4-bit error can work better on the weights without it, and
    only a score tells (measured on the demo: benchmarks/results/quality-*.md)."""
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
    if cfg.base == "nf4_roundtrip" and not four_bit:
        raise UserError(f"base=nf4_roundtrip: run {run.dir} trained on quant={run.cfg.quant.method}, not a 4-bit "
                        "base, so there is no quantization to round-trip. Use base=original.")
    loftq = run.method == "lora" and run.cfg.adapter.get("init") == "loftq"
    if cfg.base == "original" and loftq:
        # peft's replace_lora_weights_loftq leaves the 4-bit base as it is and starts B·A at the quantization error
        # W − Q(W) of each layer, so the adapter already holds a correction towards the original weights
        raise UserError(f"base=original: run {run.dir} trained adapter.init=loftq, whose adapter starts as the 4-bit "
                        "quantization error of each layer (the original weights minus their NF4 version); merged "
                        "into the original weights that correction would count twice. Use base=nf4_roundtrip (what "
                        "base=auto picks for this run): the weights the adapter was trained against.")
    candidates = candidate_bases(cfg.base, four_bit, loftq)
    metric = run.metrics.get("task_metric")
    scoring = len(candidates) > 1 and cfg.score and metric not in (None, "none")
    if len(candidates) > 1 and not scoring:
        candidates = candidates[:1]  # nothing to score them by: the faithful one
    out = Path(cfg.out).expanduser() if cfg.out else run.dir / "merged"

    trained, tokenizer = load_trained(run)
    prompts = heldout_prompts(run, cfg.check_prompts)
    # The trained model's logits first, so that only one model is in memory at a time: its own 4-bit base then
    # becomes the float32 merge base (nf4_roundtrip), or it is freed before the original weights are loaded.
    reference = prompt_logits(trained, tokenizer, prompts)
    held = heldout_for_scoring(run, tokenizer, cfg.score_samples) if scoring else None
    results: dict[str, dict[str, Any]] = {}
    merged = None
    for base in candidates:
        merged = None
        source, trained = (trained if base == "nf4_roundtrip" else None), None
        gc.collect()
        merged = merged_on(run, base, source, cfg.dtype)
        del source
        check = compare_logits(reference, merged, tokenizer, prompts)
        log.info("Merged (base=%s, saved as %s) vs trained model (%s base + adapter) on %d held-out prompts: "
                 "max |Δlogit| = %.4g, top-1 agreement = %.2f%%", base, cfg.dtype, run.cfg.quant.method,
                 check["prompts"], check["max_abs_logit_delta"], 100 * check["top1_agreement"])
        results[base] = {"check": check, **(quality(merged, tokenizer, held, metric, run) if held else {})}
    base = pick_base(results) if scoring else candidates[0]
    if scoring:
        log.info("%s", score_table(results, base, metric, run, cfg.dtype))
    if base != candidates[-1]:  # the winner was freed to score the other: build it again (deterministic)
        merged = None
        gc.collect()
        merged = merged_on(run, base, None, cfg.dtype)

    info = {"run": str(run.dir), "base_model": run.cfg.model.name_or_path, "merge_base": base, "dtype": cfg.dtype,
            "train_quant": run.cfg.quant.method, "adapter": run.method, "check": results[base]["check"],
            "selected_by": ("task score" if scoring else "base=auto: the weights the adapter trained against"
                            if cfg.base == "auto" else f"base={cfg.base}"),
            **({"candidates": results} if scoring else {})}
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(run, info))
    log.info("Wrote %s", out)
    return info


def candidate_bases(base: str, four_bit: bool, loftq: bool) -> list[str]:
    """The bases ``base`` (a MergeRunConfig.base) may merge into, the faithful one first."""
    if base != "auto":
        return [base]
    if not four_bit:
        return ["original"]
    return ["nf4_roundtrip"] if loftq else ["nf4_roundtrip", "original"]


def pick_base(results: dict[str, dict[str, Any]]) -> str:
    """The base whose merged model scored best on the held-out task; ties: the one closest to the trained model
    (highest top-1 agreement)."""
    return max(results, key=lambda b: (results[b]["task_score"], results[b]["check"]["top1_agreement"]))


def merged_on(run: Run, base: str, trained, dtype: str):
    """The run's adapter merged into ``base``, cast to ``dtype``, in eval mode. ``trained`` (consumed: its 4-bit
    base is dequantized in place) saves loading the run's model again for nf4_roundtrip."""
    if base == "nf4_roundtrip":
        trained = trained if trained is not None else load_trained(run)[0]
        model = merged_model(run, dequantized_base(trained))
    else:
        model = merged_model(run)
    return model.to(SAVE_DTYPES[dtype]).eval()


def heldout_for_scoring(run: Run, tokenizer, n: int | None) -> dict[str, Any]:
    """The run's held-out rows, as training prepared them: task rows (prompt/reference, up to ``n``, default the
    run's own count) and the encoded rows its eval loss is computed on (SFT runs)."""
    from qlora_lab import preference, prepare

    n = n if n is not None else run.metrics.get("task_eval_samples") or run.cfg.data.task_eval_samples
    objective = run.cfg.objective.name if "objective" in run.cfg else "sft"  # runs from before objectives: SFT
    if objective == "sft":
        prepared = prepare.prepare(run.cfg, tokenizer, task_samples=n)
        return {"task_rows": prepared.task_rows, "encoded": prepared.eval}
    cfg = run.cfg.copy()
    cfg.data.task_eval_samples = n
    return {"task_rows": preference.load(cfg, objective)[2], "encoded": None}


def quality(model, tokenizer, held: dict[str, Any], metric: str, run: Run) -> dict[str, Any]:
    """``model``'s held-out task score and (SFT runs) eval loss, computed as training did."""
    from qlora_lab import task

    scored = task.task_score(model, tokenizer, held["task_rows"], metric, run.cfg.data.max_new_tokens)
    out = {"task_score": scored["score"], "task_rows": scored["n"]}
    if held["encoded"] is not None:
        out["eval_loss"] = task.heldout_loss(model, held["encoded"])
    return out


def score_table(results: dict[str, dict[str, Any]], chosen: str, metric: str, run: Run, dtype: str) -> str:
    """The bases side by side, as merge prints them."""
    n = next(iter(results.values()))["task_rows"]
    lines = [f"Merge bases scored on {n} held-out rows (greedy, merged weights in {dtype}):",
             f"  {'base':<15}{metric:>12}{'eval loss':>11}{'top-1 vs trained':>18}{'max |Δlogit|':>14}"]
    for base, r in results.items():
        loss = f"{r['eval_loss']:.4f}" if "eval_loss" in r else "-"
        lines.append(f"  {base:<15}{r['task_score']:>12.3f}{loss:>11}{r['check']['top1_agreement']:>17.1%} "
                     f"{r['check']['max_abs_logit_delta']:>13.4g}")
    trained = run.metrics.get("task_score_after")
    if trained is not None:
        lines.append(f"  (the trained model, {run.cfg.quant.method} base + adapter: {metric} {trained:.3f})")
    other = next((b for b in results if b != chosen), None)
    lines.append(f"  -> base=auto picks {chosen}" + (f"; base={other} forces the other" if other else ""))
    return "\n".join(lines)


def merged_model(run: Run, float_base=None):
    """The adapter merged by peft into ``float_base`` (a float32 model on the CPU), by default the original
    weights loaded in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if float_base is None:
        float_base = AutoModelForCausalLM.from_pretrained(models.resolve_model_path(run.cfg.model.name_or_path),
                                                          dtype=torch.float32, device_map={"": "cpu"},
                                                          revision=run.cfg.model.revision,
                                                          trust_remote_code=run.cfg.model.trust_remote_code)
    return PeftModel.from_pretrained(float_base, run.adapter_dir).merge_and_unload()


def dequantized_base(trained):
    """The trained model's own 4-bit base, dequantized in place by transformers, in float32 on the CPU: the weights
    its 4-bit layers computed with in training, without loading the base a second time.

    peft's unload() puts each adapted layer's base layer back (the 4-bit weights untouched). transformers'
    PreTrainedModel.dequantize (integrations/bitsandbytes.py dequantize_and_replace) then replaces each Linear4bit
    with a Linear holding ``bnb.functional.dequantize_4bit`` of its weight, which is what bitsandbytes' 4-bit
    matmul computes with in training, one layer at a time. dequantize_4bit returns the dtype the weight was
    quantized from (quant_state.dtype, the run's model.dtype), so nothing is lost before the float32 cast. The layers that were
    never quantized (embeddings, norms, usually the LM head) are the run's own copies in model.dtype, as trained.
    The 4-bit base is moved to the CPU first, so that GPU memory never holds a dequantized model (bitsandbytes'
    CPU and CUDA dequantization compute the same table lookup times block scale; bit-equality with a GPU run was
    not checked here, the after-merge check would show a difference).
    """
    import bitsandbytes as bnb

    base = trained.unload()
    n = sum(1 for m in base.modules() if isinstance(m, bnb.nn.Linear4bit))
    if n == 0:
        raise RuntimeError("no 4-bit layers found in the trained model")
    if base.device.type != "cpu":
        base.to("cpu")
    base.dequantize()
    base.to(torch.float32)
    base.config.use_cache = True  # models.build_model turns the KV cache off for training; the merged model generates
    log.info("nf4_roundtrip: %d layers dequantized to the weights they trained with", n)
    return base


def model_card(run: Run, info: dict) -> str:
    m = run.metrics
    return "\n".join([
        "---", "library_name: transformers", "tags: [qlora-lab, merged, " + run.method + "]", "---", "",
        f"# Merged model from qlora-lab run `{run.dir.name}`", "",
        f"- base model: `{run.cfg.model.name_or_path}`",
        f"- adapter: `{run.method}` (r={m.get('lora_r') or run.cfg.adapter.r}, "
        f"alpha={m.get('lora_alpha') or run.cfg.adapter.alpha}) trained on a "
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
