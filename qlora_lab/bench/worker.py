"""One benchmark configuration in one fresh process: `python -m qlora_lab.bench.worker SPEC.json OUT.json`.

A fresh process per configuration keeps peak-memory numbers (RSS on CPU, the CUDA caching allocator's peaks)
and warm caches from leaking between configurations. OUT.json is written even when the configuration fails
(status "failed" and the error's last line), so one bad configuration never stops the matrix.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from qlora_lab.config import PREFERENCE_OBJECTIVES as PREFERENCE

# The plain recipe's adapter and quantization (plain_recipe.py: LoRA r=16, alpha=32, every linear layer in 4-bit):
# both recipes then train the same model, so the rows compare implementations. Our size rules (adapter.r=auto,
# quant.skip_modules=auto: r=64 and down_proj in 16-bit under 1B parameters) are measured with bench.overrides.
SAME_AS_PLAIN = ["adapter.r=16", "adapter.alpha=32"]
SAME_4BIT = ["quant=nf4", "quant.skip_modules=[]"]
METHOD_OVERRIDES = {
    "qlora": [*SAME_4BIT, "adapter=lora", *SAME_AS_PLAIN],
    "lora": ["quant=none", "adapter=lora", *SAME_AS_PLAIN],
    "full": ["quant=none", "adapter=full"],
    "prefix": ["quant=none", "adapter=prefix"],
    # the preference objectives on the default QLoRA base (TRL's trainers; qlora_lab/objectives.py)
    **{name: [*SAME_4BIT, "adapter=lora", *SAME_AS_PLAIN, f"objective={name}"] for name in PREFERENCE},
}
# matmul FLOPs per token and matmul parameter: forward 2N + input-gradient 2N for a frozen base (+ weight-gradient 2N
# for full fine-tuning); DPO and KTO also run the reference model forward (the adapter disabled, no gradient): + 2N
FLOPS_FACTOR = {"full": 6, "dpo": 6, "kto": 6}


class StepTimer(TrainerCallback):
    """Wall time and non-padding tokens at every optimizer step's end.

    Evaluations during training (a variant with ``trainer.eval_strategy=steps``) run between one step's end and the
    next step; their time is taken out of the marks (and reported as ``eval_s``), so tokens/s stays training's.
    """

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []
        self.losses: list[float] = []
        self.eval_losses: list[float] = []
        self.eval_s = 0.0
        self._last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()
        self.marks = [(self._last, state.num_input_tokens_seen)]

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._last = time.perf_counter()
        self.marks.append((self._last - self.eval_s, state.num_input_tokens_seen))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.eval_s += now - self._last  # since the step's end: this evaluation (and that step's log line)
        self._last = now
        if metrics and "eval_loss" in metrics:
            self.eval_losses.append(metrics["eval_loss"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])

    def measure(self, warmup: int, steps: int) -> dict[str, Any]:
        marks = self.marks[:warmup + steps + 1]  # the profiled steps after these are not measured
        (t0, n0), (t1, n1) = marks[warmup], marks[-1]
        times = [b[0] - a[0] for a, b in zip(marks, marks[1:])]  # every step, warm-up included
        return {"measured_steps": steps, "tokens": n1 - n0, "seconds": round(t1 - t0, 3),
                "tokens_per_s": round((n1 - n0) / (t1 - t0), 2), "step_time_s": round((t1 - t0) / steps, 4),
                "step_time_median_s": round(statistics.median(times[warmup:]), 4),
                "step_times_s": [round(t, 3) for t in times]}


class StepProfiler(TrainerCallback):
    """torch.profiler over ``steps`` optimizer steps that start after ``after`` steps: which ops take the time."""

    def __init__(self, after: int, steps: int) -> None:
        self.after, self.steps, self.prof = after, steps, None
        self.cuda = torch.cuda.is_available()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.after and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                torch.cuda.synchronize()
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step == self.after + self.steps:
            if self.cuda:
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)

    def top_ops(self, limit: int = 12) -> list[dict[str, Any]]:
        """The ops with the most self time (the GPU's on CUDA, else the CPU's), per profiled step."""
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        events = [e for e in self.prof.key_averages() if getattr(e, key) > 0]
        total = sum(getattr(e, key) for e in events)
        events.sort(key=lambda e: getattr(e, key), reverse=True)
        return [{"op": e.key, "share": round(getattr(e, key) / total, 4),
                 "ms_per_step": round(getattr(e, key) / 1e3 / self.steps, 3),
                 "calls_per_step": round(e.count / self.steps, 1)} for e in events[:limit]]


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _matmul_params(model_config) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding (kept when tied: the head)."""
    from qlora_lab.estimate import count_params

    total = count_params(model_config)["total"]
    tied = getattr(model_config, "tie_word_embeddings", False)
    return total if tied else total - model_config.vocab_size * model_config.hidden_size


def _qlora_lab_trainer(spec: dict, callbacks: list):
    """`qlora-lab train`'s own chain: validate → data → plan → trainer.setup, as train() runs it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from qlora_lab import estimate, models, objectives, plan, preference, prepare
    from qlora_lab.config import CONF_DIR, register_configs
    from qlora_lab.trainer import setup
    from qlora_lab.validate import validate

    register_configs()
    overrides = [f"model.name_or_path={spec['model_path']}", *METHOD_OVERRIDES[spec["method"]], "data=file",
                 f"data.path={spec['rows_path']}", f"data.eval_path={spec['rows_path']}", "data.task_eval_samples=0",
                 "score_before=false", f"trainer.per_device_train_batch_size={spec['batch']}",
                 f"trainer.max_length={spec['seq_len']}", f"trainer.max_steps={_total_steps(spec)}",
                 "trainer.eval_strategy=no", "trainer.save_strategy=no", "trainer.logging_steps=1",
                 # keep=last: a variant that evaluates must not start saving checkpoints (keep=best saves at each one)
                 "trainer.report_to=none", "keep=last",
                 *([f"memory_budget_gb={spec['memory_budget_gb']}"] if spec.get("memory_budget_gb") else []),
                 *spec.get("overrides", [])]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = spec["output_dir"]
    validate(cfg)
    model_path = models.resolve_model_path(cfg.model.name_or_path)
    tokenizer = models.build_tokenizer(cfg.model, model_path)
    prefs = spec["method"] in PREFERENCE
    prepared = (preference if prefs else prepare).prepare(cfg, tokenizer)
    the_plan = plan.make(cfg, plan.Machine.detect(), models.model_config(cfg.model, model_path),
                         estimate.shape_or_none(tokenizer, prepared.train, cfg.trainer.max_length), prepared.stats,
                         len(prepared.task_rows))
    build = objectives.setup if prefs else setup
    trainer = build(cfg, the_plan, model_path, tokenizer, prepared.train, prepared.eval, Path(spec["output_dir"]))
    for cb in callbacks:
        trainer.add_callback(cb)
    return trainer, {"loss_impl": the_plan.loss, "checkpointing": _checkpointed_share(trainer),
                     "kernels": the_plan.kernels, "dropout_impl": the_plan.dropout_impl,
                     "skip_modules": list(the_plan.skip_modules)}


def _checkpointed_share(trainer) -> float:
    """The share of decoder layers whose activations are recomputed in backward (0, 1, or 1/n for every n-th)."""
    args = trainer.args
    if not (getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing):
        return 0.0
    every = (getattr(args, "activation_checkpointing_kwargs", None) or {}).get("every_n_layers", 1)
    layers = trainer.model.config.num_hidden_layers
    return round(len(range(0, layers, every)) / layers, 3)


def _plain_trainer(spec: dict, callbacks: list):
    from qlora_lab.bench import plain_recipe

    build = plain_recipe.build_preference if spec["method"] in PREFERENCE else plain_recipe.build
    trainer = build(spec["model_path"], spec["rows_path"], spec["method"], spec["batch"], spec["seq_len"],
                    _total_steps(spec), spec["output_dir"], callbacks)
    loss = spec["method"] if spec["method"] in PREFERENCE else "fused"  # TRL's own: the objective's, SFT's fused head
    return trainer, {"loss_impl": loss, "checkpointing": _checkpointed_share(trainer), "kernels": "none",
                     "dropout_impl": "torch"}


def _total_steps(spec: dict) -> int:
    return spec["warmup_steps"] + spec["steps"] + spec.get("profile_steps", 0)


def run(spec: dict) -> dict[str, Any]:
    from qlora_lab import measure
    from qlora_lab.cpu import allocator

    result: dict[str, Any] = {"status": "running", "rss_after_imports_mb": _rss_mb("VmRSS"),
                              "allocator": allocator.active()}
    budget = spec.get("memory_budget_gb")
    measure.limit_cuda_memory(budget)  # both recipes, as on a card of that size (qlora_lab's plan is given it too)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer()
    profiler = StepProfiler(spec["warmup_steps"] + spec["steps"], spec["profile_steps"]) \
        if spec.get("profile_steps") else None
    build = _qlora_lab_trainer if spec["recipe"] == "qlora_lab" else _plain_trainer
    trainer, info = build(spec, [timer, *([profiler] if profiler else [])])
    result.update(info)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result.update(trainable_params=trainable, matmul_params=_matmul_params(trainer.model.config))
    trainer.train()
    result.update(timer.measure(spec["warmup_steps"], spec["steps"]))
    if profiler:
        result["profile"] = profiler.top_ops()
    result["flops_per_token"] = FLOPS_FACTOR.get(spec["method"], 4) * result["matmul_params"]
    result["losses"] = timer.losses
    if timer.eval_losses:  # evaluations ran during training (trainer.eval_strategy in a variant)
        result.update(evaluations=len(timer.eval_losses), eval_s=round(timer.eval_s, 2),
                      eval_loss=round(timer.eval_losses[-1], 4))
    if torch.cuda.is_available():
        result["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    result["peak_rss_mb"] = _rss_mb("VmHWM")  # training's peak: scoring below is not in it
    # the memory a budget is compared with: CUDA peak reserved, else peak RSS above the imports
    used = result.get("cuda_max_reserved_mb") or result["peak_rss_mb"] - result["rss_after_imports_mb"]
    result["budget_used_mb"] = round(used, 1)
    if budget is not None:
        result["within_budget"] = used <= budget * 1024
    if spec.get("quality_rows"):
        result.update(quality(trainer, spec["quality_rows"]))
    result["status"] = "completed"
    return result


def quality(trainer, n: int) -> dict[str, Any]:
    """The trained model's json_match and eval loss on the demo's first ``n`` held-out rows (the rows `qlora-lab
    train` scores the demo on), whatever the recipe: the same rows, greedy answers, completion-token loss."""
    from qlora_lab import task

    rows = task.demo_rows(n, "eval")
    tokenizer = trainer.processing_class
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps it
    model = trainer.model
    model.eval()
    started = time.perf_counter()
    loss = task.heldout_loss(model, task.encode_chat_rows(tokenizer, rows))
    prompts = [{"prompt": [{"role": "user", "content": r["prompt"]}], "completion": r["completion"]} for r in rows]
    scored = task.task_score(model, tokenizer, prompts, "json_match", max_new_tokens=40)
    return {"quality_scored_rows": scored["n"], "quality_eval_loss": loss, "quality_json_match": round(scored["score"], 4),
            "quality_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    spec_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = run(spec)
    except Exception as e:  # recorded, so that the matrix goes on  # noqa: BLE001
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300],
                  "out_of_memory": isinstance(e, torch.OutOfMemoryError)}
    out_path.write_text(json.dumps({**spec, **result}, indent=1))
    sys.exit(0 if result["status"] == "completed" else 1)


if __name__ == "__main__":
    main()
