"""`qlora-lab bench`: run the matrix, one fresh process per configuration; write JSON, Markdown and a PNG chart.

    qlora-lab bench                                              # SmolLM2-135M on this machine (~10 min, 2 cores)
    qlora-lab bench model=llama-3.1-8b-arch bench.methods=[qlora] bench.seq_lens=[2048] bench.batch_sizes=[4]

Per configuration: non-padding tokens/s and step time over the measured steps (warm-up steps excluded), peak
memory (CUDA max allocated / reserved; CPU peak RSS of the process), trainable parameters, MFU (4N FLOPs per token
for a frozen base, 6N for full fine-tuning, N = matmul parameters), and the memory estimate beside the measurement.
For every (method, seq_len, batch) the ratios qlora_lab / plain follow.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from qlora_lab import estimate, models
from qlora_lab.bench.rows import bench_rows, preference_rows, write_rows
from qlora_lab.config import CONF_DIR, BenchRunConfig, register_configs
from qlora_lab.config import PREFERENCE_OBJECTIVES as PREFERENCE
from qlora_lab.cpu import allocator
from qlora_lab.errors import ConfigError, exit_on_user_error
from qlora_lab.files import write_json_atomic, write_text_atomic
from qlora_lab.validate import check_choice, unknown_key_problems

log = logging.getLogger(__name__)
# dpo/kto: QLoRA with TRL's preference trainer, on the rows as chosen/rejected pairs. Not orpo: TRL's ORPOTrainer
# batches carry no input_ids, so the Trainer counts no tokens (num_input_tokens_seen stays 0, measured on the tiny
# model) and its tokens/s would read 0.
METHODS = ("qlora", "lora", "full", "prefix", *(m for m in PREFERENCE if m != "orpo"))
RECIPES = ("qlora_lab", "plain")
# dense bf16 tensor-core peak of the SXM cards (NVIDIA datasheets); other GPUs and CPUs are measured
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def validate_bench(cfg: DictConfig) -> None:
    p: list[str] = unknown_key_problems(cfg, BenchRunConfig)
    b = cfg.bench
    for m in b.methods:
        if m == "orpo":
            p.append("bench.methods: orpo is not benchmarked — TRL's ORPOTrainer batches carry no input_ids, so the "
                     "Trainer counts no tokens and tokens/s would read 0. Use dpo or kto.")
            continue
        check_choice(p, "bench.methods", m, METHODS)
    for r in b.recipes:
        check_choice(p, "bench.recipes", r, RECIPES)
    for key, values, low in (("seq_lens", b.seq_lens, 32), ("batch_sizes", b.batch_sizes, 1)):
        if not values or any(v < low for v in values):
            p.append(f"bench.{key}={list(values)}: give a non-empty list of values >= {low}.")
    for name in b.variants:
        if not str(name).replace("_", "").replace("-", "").isalnum():
            p.append(f"bench.variants: name {name!r} must be letters, digits, '-' or '_'.")
    if b.quality_rows < 0:
        p.append(f"bench.quality_rows={b.quality_rows}: give the number of held-out rows to score, or 0 for none.")
    budget = b.get("memory_budget_gb")
    if budget is not None and budget <= 0:
        p.append(f"bench.memory_budget_gb={budget}: give a positive number of GiB, or null for none.")
    if b.get("max_seq"):
        if budget is None and not torch.cuda.is_available():
            p.append("bench.max_seq=true on CPU needs bench.memory_budget_gb (the probes would grow until the "
                     "machine runs out of memory): e.g. bench.memory_budget_gb=8.")
        if b.max_seq_step < 1 or (b.seq_lens and b.max_seq_limit < b.seq_lens[0]):
            p.append(f"bench.max_seq_step={b.max_seq_step}, bench.max_seq_limit={b.max_seq_limit}: need a step >= 1 "
                     "and a limit >= the first seq_len (where the search starts).")
    if b.steps < 1 or b.warmup_steps < 0 or b.profile_steps < 0:
        p.append(f"bench.steps={b.steps}, bench.warmup_steps={b.warmup_steps}, bench.profile_steps={b.profile_steps}: "
                 "need steps >= 1, warmup_steps >= 0 and profile_steps >= 0.")
    if p:
        raise ConfigError(p)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["label"] = info["gpu"].replace(" ", "-")
    else:
        info["label"] = f"cpu-{os.cpu_count()}core-{platform.machine()}"
    return info


def peak_tflops(configured: float | None) -> tuple[float, str]:
    """(peak bf16 TFLOP/s, where the number comes from)."""
    if configured:
        return float(configured), "bench.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for key, value in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return value, f"{key} datasheet (dense bf16)"
    device, n = ("cuda", 8192) if torch.cuda.is_available() else ("cpu", 2048)
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 2.0:  # at least 2 s of matmuls, so the clock's resolution is irrelevant
        a @ b
        reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return round(2 * n**3 * reps / (time.perf_counter() - start) / 1e12, 3), f"measured ({n}^3 bf16 matmul, {device})"


def bench(cfg: DictConfig) -> dict[str, Any]:
    """Run the matrix of ``cfg.bench`` on ``cfg.model``; write and return the results."""
    validate_bench(cfg)
    b = cfg.bench
    work = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(cfg.get("output_dir"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    model_path = models.resolve_model_path(cfg.model.name_or_path) if _runs_here(cfg) else None
    if b.max_seq:
        from qlora_lab.bench import maxseq

        return maxseq.search_all(cfg, work, model_path, info, _runs_here(cfg), _run_one, _write_rows)
    peak, peak_source = peak_tflops(b.peak_tflops)
    rows_share: dict[int, float] = {}
    results: list[dict[str, Any]] = []
    recipes = [*b.recipes, *(f"qlora_lab:{name}" for name in b.variants)]
    configs = list(itertools.product(b.seq_lens, b.batch_sizes, b.methods, recipes))
    log.info("Benchmark: %d configurations of %s on %s; peak %.1f TFLOP/s (%s)", len(configs),
             cfg.model.name_or_path, info["label"], peak, peak_source)
    for seq_len, batch, method, recipe in tqdm(configs, desc="bench", unit="config"):
        row: dict[str, Any] = {"model": cfg.model.name_or_path, "method": method, "recipe": recipe,
                               "seq_len": seq_len, "batch": batch}
        if not _runs_here(cfg):
            results.append({**row, "status": "skipped",
                            "note": "GPU row: architecture-only models are benchmarked on a GPU (no CUDA device here)"})
            continue
        if seq_len not in rows_share:
            rows_share[seq_len] = _write_rows(work, model_path, seq_len,
                                             batch * (b.steps + b.warmup_steps + b.profile_steps) * 2)
        row.update(_run_one(cfg, work, model_path, row))
        if row["status"] == "completed":
            _add_derived(row, cfg, model_path, peak, rows_share[seq_len])
        results.append(row)
        tqdm.write(_summary_line(row))
        _write(cfg, info, peak, peak_source, results, chart_too=False)  # an interrupted matrix keeps what it measured
    return _write(cfg, info, peak, peak_source, results, chart_too=True)


def _write(cfg: DictConfig, info: dict[str, Any], peak: float, peak_source: str, results: list[dict[str, Any]],
           chart_too: bool) -> dict[str, Any]:
    b = cfg.bench
    out = {"machine": info, "date": dt.date.today().isoformat(), "model": cfg.model.name_or_path,
           "peak_tflops": peak, "peak_source": peak_source, "bench": OmegaConf.to_container(b, resolve=True),
           "results": results, "ratios": ratios(results)}
    name = b.name or f"bench-{info['label']}-{Path(str(cfg.model.name_or_path)).name.removeprefix('builtin:')}-{out['date']}"
    folder = Path(hydra.utils.to_absolute_path(b.results_dir)) if HydraConfig.initialized() else Path(b.results_dir)
    write_json_atomic(folder / f"{name}.json", out)
    write_text_atomic(folder / f"{name}.md", markdown(out))
    if chart_too:
        chart(out, folder / f"{name}.png")
        log.info("Results: %s.{json,md,png}", folder / name)
    return out


def _runs_here(cfg: DictConfig) -> bool:
    return torch.cuda.is_available() or not str(cfg.model.name_or_path).endswith("-arch")


def _write_rows(work: Path, model_path: str, seq_len: int, n: int, full: bool = False) -> float:
    """Write the rows for ``seq_len`` (``full``: every row as long as seq_len allows, rows-full-<seq_len>.jsonl);
    return the labelled share of their tokens (for the estimate)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = bench_rows(tokenizer, n, seq_len, full=full)
    kind = "full-" if full else ""
    write_rows(work / f"rows-{kind}{seq_len}.jsonl", rows)
    write_rows(work / f"pairs-{kind}{seq_len}.jsonl", preference_rows(rows))
    shares = [len(tokenizer(r["messages"][-1]["content"])["input_ids"]) /
              len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in rows]
    return sum(shares) / len(shares)


def _run_one(cfg: DictConfig, work: Path, model_path: str, row: dict[str, Any], probe: bool = False) -> dict[str, Any]:
    """One configuration in a fresh worker process; ``probe``: bench.max_seq's single step on rows of exactly
    seq_len tokens (rows-full-<seq_len>.jsonl), no warm-up, profile or scoring."""
    b = cfg.bench
    tag = f"{row['method']}-{row['recipe']}-s{row['seq_len']}-b{row['batch']}{'-probe' if probe else ''}"
    recipe, _, variant = row["recipe"].partition(":")
    tag = tag.replace(":", "-")
    overrides = [*b.overrides, *(b.variants[variant] if variant else [])]
    rows = f"{'pairs' if row['method'] in PREFERENCE else 'rows'}-{'full-' if probe else ''}{row['seq_len']}.jsonl"
    steps = dict(steps=1, warmup_steps=0, profile_steps=0, quality_rows=0) if probe else dict(
        steps=b.steps, warmup_steps=b.warmup_steps, profile_steps=b.profile_steps, quality_rows=b.quality_rows)
    spec = {"recipe": recipe, "method": row["method"], "model_path": model_path, "rows_path": str(work / rows),
            "seq_len": row["seq_len"], "batch": row["batch"], **steps, "overrides": overrides,
            "memory_budget_gb": b.memory_budget_gb, "output_dir": str(work / tag)}
    spec_path, out_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    # the allocator `qlora-lab train` would start with (qlora_lab), or the C library's (plain: `python script.py`)
    env = {**allocator.preload_env(allocator.requested(overrides) if recipe == "qlora_lab" else "system",
                                   dict(os.environ)), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    with open(work / f"{tag}.log", "w") as logf:
        try:
            subprocess.run([sys.executable, "-m", "qlora_lab.bench.worker", str(spec_path), str(out_path)],
                           stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=b.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {b.timeout_s} s (bench.timeout_s)"}
    if not out_path.is_file():
        return {"status": "failed", "error": f"the worker died without a result; see {work / (tag + '.log')}"}
    result = json.loads(out_path.read_text())
    return ({k: v for k, v in result.items() if k not in (*spec, "losses")}
            | {"overrides": overrides, "first_losses": result.get("losses", [])[:3]})


def _add_derived(row: dict[str, Any], cfg: DictConfig, model_path: str, peak: float, labelled: float) -> None:
    from transformers import AutoConfig

    row["mfu"] = round(row["tokens_per_s"] * row["flops_per_token"] / (peak * 1e12), 4)
    if row["method"] in PREFERENCE:  # estimate.py models SFT's activations only
        row["estimated_mb"] = row["measured_over_estimate"] = None
        return
    quant = "nf4" if row["method"] == "qlora" else "none"
    adapter = {"qlora": "lora"}.get(row["method"], row["method"])
    est = estimate.estimate(AutoConfig.from_pretrained(model_path), quant=quant, adapter=adapter,
                            batch=row["batch"], seq_len=row["seq_len"], checkpointing=row["checkpointing"],
                            loss=row["loss_impl"], loss_tokens=labelled,
                            dropout_impl=row.get("dropout_impl", "torch"), kernels=row.get("kernels", "none"),
                            skip_modules=tuple(row.get("skip_modules", ())))
    row["estimated_mb"] = round(est["total_bytes"] / 2**20, 1)
    # what the estimate covers: the device's training memory (CUDA allocated; CPU: RSS above the imports)
    measured = row.get("cuda_max_allocated_mb") or row["peak_rss_mb"] - row["rss_after_imports_mb"]
    row["measured_over_estimate"] = round(measured / row["estimated_mb"], 2)


def _peak_mb(row: dict[str, Any]) -> float:
    return row.get("cuda_max_reserved_mb") or row["peak_rss_mb"]


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """qlora_lab / plain for every (method, seq_len, batch) where both completed."""
    done = {(r["method"], r["seq_len"], r["batch"], r["recipe"]): r for r in results if r["status"] == "completed"}
    out = []
    for (method, seq, batch, recipe), ours in done.items():
        plain = done.get((method, seq, batch, "plain"))
        if recipe.startswith("qlora_lab") and plain:
            out.append({"method": method, "seq_len": seq, "batch": batch, "recipe": recipe,
                        "tokens_per_s_ratio": round(ours["tokens_per_s"] / plain["tokens_per_s"], 2),
                        "peak_mem_ratio": round(_peak_mb(ours) / _peak_mb(plain), 2)})
    return out


def _summary_line(r: dict[str, Any]) -> str:
    head = f"{r['method']:>6} {r['recipe']:>24} seq {r['seq_len']:>5} batch {r['batch']:>3}: "
    if r["status"] != "completed":
        return head + f"{r['status']} — {r.get('error') or r.get('note')}"
    return head + (f"{r['tokens_per_s']:>9.1f} tok/s  step {r['step_time_s']:.3f} s  peak {_peak_mb(r):,.0f} MiB  "
                   f"MFU {100 * r['mfu']:.1f}%")


def markdown(out: dict[str, Any]) -> str:
    m = out["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads)"
    cuda = "gpu" in m
    lines = [f"# qlora-lab bench — {out['model']} on {where}, {out['date']}", "",
             f"Peak for MFU: {out['peak_tflops']} TFLOP/s ({out['peak_source']}); {out['bench']['steps']} measured "
             f"steps after {out['bench']['warmup_steps']} warm-up; tokens = non-padding tokens; rows of "
             "seq_len/4 to seq_len tokens; each configuration in a fresh process.", ""]
    if out["bench"]["overrides"]:
        lines += [f"qlora_lab overrides: `{' '.join(out['bench']['overrides'])}`", ""]
    kept = sorted({m for r in out["results"] for m in r.get("skip_modules") or ()})
    if kept:
        lines += [f"qlora_lab's 4-bit rows keep {', '.join(kept)} in 16-bit (quant.skip_modules: auto keeps down_proj "
                  "for models under 1B parameters); the plain recipe quantizes every linear layer.", ""]
    for name, overrides in out["bench"]["variants"].items():
        lines.append(f"- `qlora_lab:{name}` = qlora_lab with `{' '.join(overrides)}`" if overrides else
                     f"- `qlora_lab:{name}` = qlora_lab again (no override: the run-to-run noise)")
    if out["bench"]["variants"]:
        lines.append("")
    mem = "peak reserved MiB | max allocated MiB" if cuda else "peak RSS MiB"
    lines += [f"| method | seq | batch | recipe | tok/s | step s (median) | {mem} | estimate MiB (meas./est.) | MFU | "
              "trainable | loss | ckpt | kernels | malloc | first loss |", "|" + "---|" * (16 if cuda else 15)]
    for r in out["results"]:
        key = f"| {r['method']} | {r['seq_len']} | {r['batch']} | {r['recipe']} |"
        if r["status"] != "completed":
            lines.append(f"{key} {r['status']}: {r.get('error') or r.get('note')} |" + " |" * (11 if cuda else 10))
            continue
        memcols = (f"{r['cuda_max_reserved_mb']:,.0f} | {r['cuda_max_allocated_mb']:,.0f}" if cuda
                   else f"{r['peak_rss_mb']:,.0f}")
        est = f"{r['estimated_mb']:,.0f} ({r['measured_over_estimate']})" if r.get("estimated_mb") else "-"
        lines.append(f"{key} {r['tokens_per_s']:,.1f} | {r['step_time_s']:.3f}{_median(r)} | {memcols} | "
                     f"{est} | {100 * r['mfu']:.1f}% | "
                     f"{r['trainable_params']:,} | {r['loss_impl']} | {_share(r['checkpointing'])} | "
                     f"{r.get('kernels', 'none')} | {r.get('allocator', 'system')} | {_first_loss(r)} |")
    scored = [r for r in out["results"] if r["status"] == "completed" and "quality_json_match" in r]
    if scored:
        total = out["bench"]["warmup_steps"] + out["bench"]["steps"] + out["bench"]["profile_steps"]
        lines += ["", f"Quality after the {total} steps (warm-up included): the demo's first "
                  f"{scored[0]['quality_scored_rows']} held-out rows, zero-shot: greedy json_match, and the loss on "
                  "their answers' tokens (scoring is not in the time or peak memory):", "",
                  "| method | seq | batch | recipe | eval loss | json_match | tok/s | peak MiB |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['seq_len']} | {r['batch']} | {r['recipe']} | {r['quality_eval_loss']:.4f} | "
                  f"{r['quality_json_match']:.3f} | {r['tokens_per_s']:,.1f} | {_peak_mb(r):,.0f} |" for r in scored]
    evaluated = [r for r in out["results"] if r["status"] == "completed" and r.get("evaluations")]
    if evaluated:
        lines += ["", "Evaluations during training (their time is not in tok/s or step s; peak memory includes them):",
                  ""]
        lines += [f"- {r['method']} seq {r['seq_len']} batch {r['batch']} {r['recipe']}: {r['evaluations']} "
                  f"evaluations, {r['eval_s']:.1f} s, last eval loss {r['eval_loss']:.4f}" for r in evaluated]
    if out["ratios"]:
        lines += ["", "qlora_lab / plain recipe (same model, rows, adapter and batch):", "",
                  "| method | seq | batch | recipe | tokens/s ratio | peak memory ratio |", "|---|---|---|---|---|---|"]
        lines += [f"| {x['method']} | {x['seq_len']} | {x['batch']} | {x['recipe']} | {x['tokens_per_s_ratio']}x | "
                  f"{x['peak_mem_ratio']}x |" for x in out["ratios"]]
    for r in out["results"]:
        if r.get("profile"):
            lines += ["", f"Where the time goes — {r['method']} seq {r['seq_len']} batch {r['batch']} {r['recipe']} "
                      f"({out['bench']['profile_steps']} profiled steps after the measured ones; self "
                      f"{'GPU' if cuda else 'CPU'} time):", "", "| op | share | ms per step | calls per step |",
                      "|---|---:|---:|---:|"]
            lines += [f"| `{x['op']}` | {100 * x['share']:.1f}% | {x['ms_per_step']:,.1f} | {x['calls_per_step']:g} |"
                      for x in r["profile"]]
    return "\n".join(lines) + "\n"


def _median(r: dict[str, Any]) -> str:
    return f" ({r['step_time_median_s']:.3f})" if "step_time_median_s" in r else ""


def _first_loss(r: dict[str, Any]) -> str:
    """The first step's loss: recipes that see the same batches (qlora_lab and its variants) should agree."""
    return f"{r['first_losses'][0]:.4f}" if r.get("first_losses") else ""


def _share(checkpointed: float) -> str:
    return {0: "off", 1: "all"}.get(checkpointed, f"{100 * checkpointed:.0f}% of layers")


def chart(out: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no chart (%s)", path)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in out["results"] if r["status"] == "completed"]
    if not done:
        return
    labels = sorted({(r["method"], r["seq_len"], r["batch"]) for r in done}, key=str)
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.4 * len(labels)) * 2, 4))
    recipes = list(dict.fromkeys(r["recipe"] for r in done))
    width = 0.8 / len(recipes)
    for ax, key, title in ((axes[0], "tokens_per_s", "tokens/s (higher is better)"),
                           (axes[1], "peak", "peak memory MiB (lower is better)")):
        for k, recipe in enumerate(recipes):
            values = []
            for label in labels:
                r = next((r for r in done if (r["method"], r["seq_len"], r["batch"]) == label
                          and r["recipe"] == recipe), None)
                values.append((_peak_mb(r) if key == "peak" else r[key]) if r else 0)
            ax.bar([i + k * width for i in range(len(labels))], values, width, label=recipe)
        ax.set_xticks([i + width / 2 for i in range(len(labels))], [f"{m}\n{s}x{b}" for m, s, b in labels])
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{out['model']} — {out['machine'].get('gpu') or out['machine']['label']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------------------
# the Hydra shell

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    out = bench(cfg)
    if cfg.bench.max_seq:
        from qlora_lab.bench import maxseq

        print(maxseq.markdown(out), flush=True)
        return float(out["objective"])
    print(markdown(out), flush=True)
    speedups = [x["tokens_per_s_ratio"] for x in out["ratios"]]
    return float(sum(speedups) / len(speedups)) if speedups else float("nan")
