"""`qlora-lab bench bench.max_seq=true`: the longest sequence each recipe trains at a batch size, inside a budget.

    qlora-lab bench bench.max_seq=true model=llama-3.1-8b-arch bench.methods=[qlora] bench.batch_sizes=[1] \
        bench.memory_budget_gb=24 bench.seq_lens=[8192]

For every (method, batch size, recipe): probes of one training step on rows of exactly L tokens, each in a fresh
worker process (as the matrix's configurations: bench/worker.py), L doubling from seq_lens[0] while it fits (up to
max_seq_limit) or halving while it does not (down to max_seq_step), then bisecting between the longest fit and the
shortest failure until they are max_seq_step tokens apart. A probe fits when its step completed inside the budget: on CUDA the worker's memory
is capped at memory_budget_gb (else the card), so an over-budget step fails with out-of-memory; on CPU the step's
training memory (peak RSS above the imports) is compared with memory_budget_gb. A probe that fails for another
reason stops that search and is reported, never read as "does not fit".
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from qlora_lab.files import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


def longest(probe: Callable[[int], bool | None], start: int, limit: int, step: int) -> tuple[int | None, str]:
    """The longest length that ``probe`` says fits: from ``start``, doubling while it fits (capped at ``limit``) or
    halving while it does not (down to ``step``), then bisecting on the multiples of ``step`` between the longest fit
    and the shortest failure until none is left (they are then at most ``step`` apart where both are multiples). ``probe(L)``: True fits, False does not, None failed for another reason
    (the search stops there). Returns (length, or None when not even ``step`` tokens fit; why the search stopped)."""
    fit, fail, length = None, None, start
    while fit is None or fail is None:
        ok = probe(length)
        if ok is None:
            return fit, f"a probe at {length} tokens failed for another reason than memory"
        if ok:
            fit = length
            if fail is None and length >= limit:
                return fit, f"fits at bench.max_seq_limit={limit}"
            length = min(2 * length, limit)
        else:
            fail = length
            if fit is None and length <= step:
                return None, f"{length} tokens do not fit"
            length = max(length // 2, step)
    while True:  # the multiples of step strictly between fit and fail (start and limit need not be multiples)
        low, high = fit // step + 1, -(-fail // step) - 1
        if low > high:
            break
        mid = (low + high) // 2 * step
        ok = probe(mid)
        if ok is None:
            return fit, f"a probe at {mid} tokens failed for another reason than memory"
        fit, fail = (mid, fail) if ok else (fit, mid)
    return fit, f"{fail} tokens do not fit"


def fits(result: dict[str, Any]) -> bool | None:
    """A probe's worker result read as fits / does not fit / failed otherwise."""
    if result["status"] == "completed":
        return result.get("within_budget", True)
    return False if result.get("out_of_memory") else None


def search_all(cfg: DictConfig, work: Path, model_path: str | None, info: dict[str, Any], runs_here: bool,
               run_one: Callable, write_rows: Callable) -> dict[str, Any]:
    """Every (method, batch, recipe)'s search; writes <name>.{json,md} after every probe (an interrupted run keeps
    what it probed)."""
    b = cfg.bench
    recipes = [*b.recipes, *(f"qlora_lab:{name}" for name in b.variants)]
    written: set[int] = set()
    rows_per_file = 2 * max(b.batch_sizes)  # one file per length, shared by every batch size's probes
    searches: list[dict[str, Any]] = []
    for method, batch, recipe in itertools.product(b.methods, b.batch_sizes, recipes):
        row: dict[str, Any] = {"model": cfg.model.name_or_path, "method": method, "recipe": recipe, "batch": batch}
        if not runs_here:
            searches.append({**row, "status": "skipped", "note": "GPU row: architecture-only models are "
                                                                  "benchmarked on a GPU (no CUDA device here)"})
            continue
        probes: list[dict[str, Any]] = []
        search = {**row, "status": "running", "max_seq": None, "stopped": None, "probes": probes}
        searches.append(search)
        bar = tqdm(desc=f"max seq {method} {recipe} batch {batch}", unit="probe")

        def probe(length: int) -> bool | None:
            if length not in written:
                write_rows(work, model_path, length, rows_per_file, full=True)
                written.add(length)
            result = run_one(cfg, work, model_path, {**row, "seq_len": length}, probe=True)
            ok = fits(result)
            probes.append({"seq_len": length, "fits": ok, "status": result["status"],
                           "used_mb": result.get("budget_used_mb"),
                           **({"error": result["error"]} if result.get("error") else {})})
            bar.update()
            bar.set_postfix_str(f"{length} tokens: {'fits' if ok else 'does not fit' if ok is False else 'failed'}")
            _write(cfg, info, searches)  # after every probe: a search cut short keeps its probes
            return ok

        best, why = longest(probe, b.seq_lens[0], b.max_seq_limit, b.max_seq_step)
        bar.close()
        search.update(status="completed", max_seq=best, stopped=why)
        tqdm.write(f"{method} {recipe} batch {batch}: longest {best} tokens ({why})")
        _write(cfg, info, searches)
    return _write(cfg, info, searches)


def ratios(searches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """qlora_lab's longest / the plain recipe's, per (method, batch), where both found one."""
    done = {(s["method"], s["batch"], s["recipe"]): s for s in searches if s["status"] == "completed" and s.get("max_seq")}
    return [{"method": m, "batch": b, "recipe": r, "max_seq_ratio": round(s["max_seq"] / plain["max_seq"], 2)}
            for (m, b, r), s in done.items() if r.startswith("qlora_lab") and (plain := done.get((m, b, "plain")))]


def _write(cfg: DictConfig, info: dict[str, Any], searches: list[dict[str, Any]]) -> dict[str, Any]:
    b = cfg.bench
    found = ratios(searches)
    out = {"machine": info, "date": dt.date.today().isoformat(), "model": cfg.model.name_or_path, "max_seq": True,
           "bench": OmegaConf.to_container(b, resolve=True), "searches": searches, "ratios": found,
           "objective": (sum(x["max_seq_ratio"] for x in found) / len(found)) if found else float("nan")}
    model = Path(str(cfg.model.name_or_path)).name.removeprefix("builtin:")
    name = b.name or f"max-seq-{info['label']}-{model}-{out['date']}"
    folder = Path(hydra.utils.to_absolute_path(b.results_dir)) if HydraConfig.initialized() else Path(b.results_dir)
    write_json_atomic(folder / f"{name}.json", out)
    write_text_atomic(folder / f"{name}.md", markdown(out))
    log.info("Results: %s.{json,md}", folder / name)
    return out


def markdown(out: dict[str, Any]) -> str:
    m, b = out["machine"], out["bench"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_cores']} cores)"
    budget = f"{b['memory_budget_gb']:g} GiB" if b["memory_budget_gb"] else "the whole card"
    lines = [f"# qlora-lab bench — longest trainable sequence, {out['model']} on {where}, {out['date']}", "",
             f"Budget: {budget} (MiB used: CUDA peak reserved; CPU peak RSS above the imports). One training step per probe on rows of exactly the probed length, each in a fresh "
             f"process; from {b['seq_lens'][0]} doubling (up to {b['max_seq_limit']}) or halving, then bisecting to "
             f"{b['max_seq_step']} tokens.", "",
             "| method | batch | recipe | longest seq | stopped | probes (tokens: MiB used, fits) |", "|---|---|---|---|---|---|"]
    for s in out["searches"]:
        if s["status"] == "skipped":
            lines.append(f"| {s['method']} | {s['batch']} | {s['recipe']} | {s['status']}: {s.get('note')} | | |")
            continue
        probes = ", ".join(f"{p['seq_len']}: {p['used_mb'] or 0:,.0f} {'yes' if p['fits'] else 'no' if p['fits'] is False else 'error'}"
                           for p in s["probes"])
        lines.append(f"| {s['method']} | {s['batch']} | {s['recipe']} | {s['max_seq'] or '-'} | "
                     f"{s['stopped'] or 'searching (or cut short)'} | "
                     f"{probes} |")
    errors = [(s, p) for s in out["searches"] for p in s.get("probes", []) if p.get("error")]
    if errors:
        lines += ["", "Failed probes:", ""] + [f"- {s['recipe']} at {p['seq_len']}: {p['error']}" for s, p in errors]
    if out["ratios"]:
        lines += ["", "| method | batch | recipe | longest / plain recipe's |", "|---|---|---|---|"]
        lines += [f"| {x['method']} | {x['batch']} | {x['recipe']} | {x['max_seq_ratio']}x |" for x in out["ratios"]]
    return "\n".join(lines) + "\n"
