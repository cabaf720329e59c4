"""Preference data for objective=dpo/orpo/kto: TRL's formats, the embedded preference demo, the held-out split.

Rows are in TRL's own formats, which its trainers tokenize themselves (through the chat template for conversational
rows): paired ``prompt``/``chosen``/``rejected`` (DPO, ORPO) and unpaired ``prompt``/``completion``/``label`` (KTO;
pairs are split into a desirable and an undesirable row). Each field is a string (plain) or a list of chat messages
(conversational), as for SFT rows. ``data.columns`` renames columns first; ``data.bad_rows`` decides about rows with
an empty or missing field; ``data.max_train_samples`` / ``max_eval_samples`` cap the rows.

The embedded demo (``data=demo``) is the demo task of task.py as pairs: chosen = the correct JSON, rejected = a
plausible wrong one (two fields swapped, another city, or an age off by a few years), so ``qlora-lab train
objective=dpo`` runs offline. Not cached (TRL's trainers tokenize the rows when they are built; a few seconds for the
demo); mixtures, hub datasets and streaming are SFT-only for now (the validator says so).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qlora_lab import task
from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

PAIRED = ("prompt", "chosen", "rejected")
UNPAIRED = ("prompt", "completion", "label")


def demo_pairs(n: int, split: str, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` prompt/chosen/rejected rows of the demo task (plain strings; the same prompts as task.demo_rows)."""
    rng = random.Random(f"{seed}-{split}-rejected")
    return [{"prompt": row["prompt"], "chosen": row["completion"], "rejected": wrong_answer(row["completion"], rng)}
            for row in task.demo_rows(n, split, seed)]


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong JSON answer of the demo task: two fields swapped, another city, or an age off by a few."""
    fact = json.loads(answer)
    wrong = dict(fact)
    kind = rng.choice(("swap", "city", "age"))
    if kind == "swap":  # the city and the job in each other's place
        wrong["city"], wrong["job"] = fact["job"], fact["city"]
    elif kind == "city":
        wrong["city"] = rng.choice([c for c in task._CITIES if c != fact["city"]])
    else:
        wrong["age"] = fact["age"] + rng.choice((-3, -2, -1, 1, 2, 3))
    return json.dumps(wrong)


def _as_chat(rows: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """Plain-string pairs as conversations (the chat template is what the instruct model was tuned on)."""
    out = []
    for r in rows:
        prompt = r["prompt"]
        if isinstance(prompt, str):
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        out.append({"prompt": prompt, **{k: [{"role": "assistant", "content": v}] if isinstance(v, str) else v
                                         for k, v in r.items() if k in ("chosen", "rejected", "completion")},
                    **({"label": r["label"]} if "label" in r else {})})
    return out


def unpaired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KTO's rows from pairs: the chosen completion desirable, the rejected one undesirable."""
    out = []
    for r in rows:
        if "label" in r:
            out.append(r)
            continue
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return out


def _read(path: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    fp = Path(path).expanduser()
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(fp.suffix.lower())
    if kind is None:
        raise UserError(f"data.path={path!r}: use a .jsonl, .json, .csv or .parquet file of preference rows.")
    return load_dataset(kind, data_files=str(fp), split="train").to_list()


def _check(rows: list[dict[str, Any]], where: str, cfg: DictConfig) -> tuple[list[dict[str, Any]], str]:
    """(usable rows, their format "paired" or "unpaired"); rows with an empty field are an error or skipped."""
    columns = dict(cfg.columns or {})
    rows = [{columns.get(k, k): v for k, v in r.items()} for r in rows]
    keys = set(rows[0]) if rows else set()
    if set(PAIRED) <= keys:
        fmt, need = "paired", PAIRED
    elif set(UNPAIRED) <= keys:
        fmt, need = "unpaired", UNPAIRED
    else:
        raise UserError(f"{where}: preference rows need the columns prompt/chosen/rejected (DPO, ORPO, KTO) or "
                        f"prompt/completion/label (KTO); found {sorted(keys)}. Rename columns with "
                        "data.columns={old:new}.")
    good, bad = [], []
    for i, r in enumerate(rows):
        empty = [k for k in need if k != "label" and not r.get(k)]
        if fmt == "unpaired" and not isinstance(r.get("label"), bool):
            empty.append("label (true or false)")
        (bad if empty else good).append((i, r, empty))
    if bad and cfg.bad_rows == "error":
        i, _, empty = bad[0]
        raise UserError(f"{where}, row {i + 1}: {', '.join(empty)} missing or empty ({len(bad)} such row(s)). Fix the "
                        "rows, or set data.bad_rows=skip to leave them out.")
    if len(bad) > cfg.max_bad_fraction * max(len(rows), 1):
        raise UserError(f"{where}: {len(bad)} of {len(rows)} rows are unusable, more than data.max_bad_fraction="
                        f"{cfg.max_bad_fraction}: is it preference data?")
    if bad:
        log.warning("%s: skipped %d row(s) with an empty field (first: row %d)", where, len(bad), bad[0][0] + 1)
    return [r for _, r, _ in good], fmt


def load(cfg: DictConfig, objective: str) -> tuple[list[dict], list[dict], list[dict], dict[str, Any], list[dict]]:
    """(train rows, held-out rows, held-out prompt/completion rows for the task score, stats, held-out pairs to
    score) for ``objective``."""
    d = cfg.data
    if d.source == "demo":
        train = demo_pairs(d.max_train_samples or 400, "train", d.seed)
        held = demo_pairs(d.max_eval_samples or 48, "eval", d.seed)
        fmt = "paired"
    else:
        train, fmt = _check(_read(d.path), f"data.path={d.path}", d)
        if d.eval_path:
            held, held_fmt = _check(_read(d.eval_path), f"data.eval_path={d.eval_path}", d)
            if held_fmt != fmt:
                raise UserError(f"data.eval_path={d.eval_path}: {held_fmt} rows, but data.path has {fmt} rows.")
        else:
            rng = random.Random(d.seed)
            rows = list(train)
            rng.shuffle(rows)
            cut = max(1, round(len(rows) * d.eval_fraction))
            held, train = rows[:cut], rows[cut:]
        train, held = train[:d.max_train_samples or None], held[:d.max_eval_samples or None]
    if fmt == "unpaired" and objective in ("dpo", "orpo"):
        raise UserError(f"objective={objective} trains on pairs (prompt/chosen/rejected); data.path has unpaired "
                        "prompt/completion/label rows, which only objective=kto uses.")
    train, held = _as_chat(train, d.system_prompt), _as_chat(held, d.system_prompt)
    task_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in held if "chosen" in r]
    task_rows += [{"prompt": r["prompt"], "completion": r["completion"]} for r in held if r.get("label") is True]
    pairs = [r for r in held if "chosen" in r][:d.task_eval_samples]
    if objective == "kto":
        train, held = unpaired(train), unpaired(held)
    stats = {"format": fmt, "objective": objective, "train_rows": len(train), "eval_rows": len(held),
             "sources": [{"label": d.source if d.source == "demo" else str(d.path), "format": fmt}]}
    return train, held, task_rows[:d.task_eval_samples], stats, pairs


def prepare(cfg: DictConfig, tokenizer, run_dir: Path | None = None):
    """The rows of a preference run as datasets (TRL's trainers tokenize them), like prepare.prepare for SFT; the
    held-out pairs it scores are ``.pairs``."""
    from datasets import Dataset

    from qlora_lab.files import write_json_atomic
    from qlora_lab.prepare import DATA_INFO, Prepared

    objective = cfg.objective.name
    train, held, task_rows, stats, pairs = load(cfg, objective)
    if run_dir is not None:
        write_json_atomic(run_dir / DATA_INFO, stats)
    log.info("Preference data (%s, %s rows) for objective=%s: %d train / %d held-out rows", cfg.data.source,
             stats["format"], objective, len(train), len(held))
    prepared = Prepared(Dataset.from_list(train), Dataset.from_list(held), task_rows, stats)
    prepared.pairs = pairs
    return prepared
