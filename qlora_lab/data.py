"""Training data: load (demo, file, hub), detect the row format, convert to TRL's dataset formats.

Every format becomes one of TRL's two SFT shapes:
- conversational prompt/completion — ``{"prompt": [messages...], "completion": [assistant message]}`` — for
  ``messages``, ``instruction`` (instruction/input/output) and ``prompt_completion`` rows. SFTTrainer applies the
  model's chat template and, since these are prompt/completion rows, computes the loss on the completion only
  (TRL's ``completion_only_loss`` default). A ``messages`` row is split before its last assistant turn.
- language modelling — ``{"text": ...}`` — for ``text`` rows: loss on every token.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from datasets import Dataset
from omegaconf import DictConfig

from qlora_lab import task
from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

# format -> the columns that identify it (checked in this order by auto-detection)
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "instruction": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant", "tool")


def load_splits(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets in TRL format, per ``cfg`` (the ``data`` group)."""
    if cfg.source == "demo":
        n_train = cfg.max_train_samples or 400
        n_eval = cfg.max_eval_samples or 48
        train_rows = task.demo_rows(n_train, "train", cfg.seed)
        eval_rows = task.demo_rows(n_eval, "eval", cfg.seed)
        fmt = "prompt_completion"
        origin = "the demo task"
    else:
        train_rows, origin = _load_rows(cfg, cfg.path, cfg.split)
        eval_rows = None
        if cfg.eval_path:  # a split of the same dataset (hub), or another file
            hub = cfg.source == "hub"
            eval_rows = _load_rows(cfg, cfg.path if hub else cfg.eval_path, cfg.eval_path if hub else cfg.split)[0]
        fmt = detect_format(train_rows, cfg.format, origin)
        if eval_rows is not None:
            detect_format(eval_rows, fmt, cfg.eval_path)
    train = [convert_row(r, fmt, cfg.system_prompt, origin, i) for i, r in enumerate(train_rows)]
    if eval_rows is None:
        train, evals = _holdout(train, cfg.eval_fraction, cfg.seed, origin)
    else:
        evals = [convert_row(r, fmt, cfg.system_prompt, cfg.eval_path, i) for i, r in enumerate(eval_rows)]
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        evals = evals[: cfg.max_eval_samples]
    log.info("Data: %d train / %d held-out rows from %s (format: %s)", len(train), len(evals), origin, fmt)
    return Dataset.from_list(train), Dataset.from_list(evals)


def _holdout(rows: list[dict], fraction: float, seed: int, origin: str) -> tuple[list[dict], list[dict]]:
    # Rows stay Python lists up to here (not datasets.Dataset.train_test_split) because every row is checked and
    # converted one by one with its row number for the error message; the split keeps the file's order in each part.
    if len(rows) < 2:
        raise UserError(f"{origin}: only {len(rows)} row(s); at least 2 are needed to hold one out for evaluation "
                        "(or pass data.eval_path=...).")
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


# --------------------------------------------------------------------------------------------------------------
# loading


def _load_rows(cfg: DictConfig, path: str, split: str) -> tuple[list[dict[str, Any]], str]:
    if cfg.source == "hub":
        return _load_hub(cfg, path, split), f"hub dataset {path!r} (split {split!r})"
    fp = Path(path).expanduser()
    if not fp.is_file():
        raise UserError(f"data file {path!r} not found (looked in {fp.resolve().parent}).")
    suffix = fp.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(fp)
    elif suffix == ".json":
        rows = _read_json(fp)
    elif suffix in (".csv", ".parquet"):
        from datasets import load_dataset

        try:
            rows = load_dataset(suffix[1:], data_files=str(fp), split="train").to_list()
        except Exception as e:  # noqa: BLE001 - pyarrow/pandas raise many types for malformed files
            while (e.__cause__ or e.__context__) is not None:  # datasets wraps the parser's error, which has the row
                e = e.__cause__ or e.__context__
            raise UserError(f"{fp}: could not read as {suffix[1:]}: {type(e).__name__}: {str(e).strip()[:300]}. "
                            "Fix the file (quotes, separators, one row per line) or convert it to .jsonl.") from None
    else:
        raise UserError(f"{fp}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet.")
    if not rows:
        raise UserError(f"{fp}: the file holds no rows. Add at least a few examples.")
    return _rename(rows, cfg.columns), str(fp)


def _read_jsonl(fp: Path) -> list[dict[str, Any]]:
    # Parsed here rather than by datasets' json builder, whose errors do not say which line is broken.
    rows = []
    with fp.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{fp}:{lineno}: malformed JSON ({e.msg} at column {e.colno}). Each line must be one "
                                "JSON object, e.g. {\"prompt\": \"...\", \"completion\": \"...\"}.") from None
            if not isinstance(row, dict):
                raise UserError(f"{fp}:{lineno}: expected a JSON object, got {type(row).__name__}.")
            rows.append(row)
    return rows


def _read_json(fp: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(fp.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{fp}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}).") from None
    if isinstance(data, dict):  # {"data": [...]} or a single column-oriented table
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        elif lists and all(isinstance(v, list) and len(v) == len(lists[0]) for v in data.values()):
            data = [dict(zip(data, vals)) for vals in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{fp}: expected a list of JSON objects (one per example).")
    return data


def _load_hub(cfg: DictConfig, path: str, split: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(path, cfg.name, split=split)
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
        raise UserError(f"could not load hub dataset {path!r} (config {cfg.name!r}, split {split!r}): "
                        f"{str(e).splitlines()[0]}\nFix: check the id and split, or download it and use "
                        "data=file data.path=...") from None
    return _rename(ds.to_list(), cfg.columns)


def _rename(rows: list[dict[str, Any]], columns) -> list[dict[str, Any]]:
    """Apply data.columns ({old: new}) to every row."""
    if not columns:
        return rows
    return [{columns.get(k, k): v for k, v in r.items()} for r in rows]


# --------------------------------------------------------------------------------------------------------------
# formats


def detect_format(rows: list[dict[str, Any]], fmt: str, origin: str) -> str:
    """The configured format, or the first one whose columns the first row has; else a clear error."""
    if not rows:
        raise UserError(f"{origin}: no rows.")
    found = sorted(rows[0])
    if fmt != "auto":
        need = FORMAT_COLUMNS[fmt]
        if not all(c in rows[0] for c in need):
            raise UserError(f"{origin}: data.format={fmt} needs column(s) {list(need)}, found {found}. Rename with "
                            f"data.columns={{old: new}} or pick another data.format.")
        return fmt
    for name, need in FORMAT_COLUMNS.items():
        if all(c in rows[0] for c in need):
            return name
    expected = "; ".join(f"{k}: {list(v)}" for k, v in FORMAT_COLUMNS.items())
    raise UserError(f"{origin}: cannot tell the data format from columns {found}. Expected one of — {expected}. "
                    "Rename columns with data.columns={old: new} (e.g. data.columns={question:prompt,answer:completion}).")


def _messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
    """``value`` checked as a non-empty list of {role, content} chat messages."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: {field!r} must be a non-empty list of {{\"role\", \"content\"}} objects, "
                        f"got {value!r}.")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: {field}[{j}] must be {{\"role\": one of {list(ROLES)}, \"content\": "
                            f"string}}, got {m!r}.")
    return value


def convert_row(row: dict[str, Any], fmt: str, system: str | None, origin: str, index: int) -> dict[str, Any]:
    """One row in TRL's conversational prompt/completion or text shape."""
    where = f"{origin}, row {index + 1}"

    def text(key: str, allow_empty: bool = False) -> str:
        value = row.get(key)
        if value is None or not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise UserError(f"{where}: field {key!r} must be a non-empty string, got {value!r}.")
        return value

    if fmt == "text":
        return {"text": text("text")}
    if fmt == "messages":
        msgs = _messages(row.get("messages"), "messages", where)
        if msgs[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's answer (role 'assistant'), "
                            f"got role {msgs[-1]['role']!r}.")
        prompt, completion = msgs[:-1], msgs[-1:]
    elif fmt == "instruction":
        user = text("instruction")
        extra = row.get("input")
        if isinstance(extra, str) and extra.strip():
            user = f"{user}\n\n{extra}"
        prompt = [{"role": "user", "content": user}]
        completion = [{"role": "assistant", "content": text("output")}]
    elif isinstance(row.get("prompt"), list):  # TRL's conversational prompt/completion: lists of messages
        prompt = _messages(row["prompt"], "prompt", where)
        completion = _messages(row.get("completion"), "completion", where)
        if [m["role"] for m in completion] != ["assistant"]:
            raise UserError(f"{where}: 'completion' must be one assistant message, got roles "
                            f"{[m['role'] for m in completion]}.")
    else:  # prompt_completion
        prompt = [{"role": "user", "content": text("prompt")}]
        completion = [{"role": "assistant", "content": text("completion")}]
    if not prompt or all(m["role"] == "system" for m in prompt):
        raise UserError(f"{where}: nothing to answer: add the user's message before the assistant's answer.")
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return {"prompt": prompt, "completion": completion}
