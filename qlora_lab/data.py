"""Training data: load (demo, file, hub, mixtures), detect each source's row format, convert every row to one shape.

Every row becomes one of two shapes, in an Arrow table (``datasets``), never the whole file as Python objects:
- a conversation — column ``chat``: the messages as one JSON string (``[{"role", "content", ...}, ...]``), and
  ``train_from``: the index of the first message that may be trained (0 for chats; after the prompt for TRL's
  prompt/completion rows, whose prompt is never trained, as in TRL). Which assistant turns are trained is
  ``data.train_on`` (qlora_lab/encode.py renders and masks them);
- plain text — column ``text``: loss on every token.

Formats (detected from the columns of the first row, or forced with ``data.format``): ``messages`` (role/content
chat), ``sharegpt`` (``conversations`` of ``from``/``value``), ``instruction`` (instruction/input/output),
``prompt_completion`` (plain strings or TRL's conversational lists), ``text``. ``data.roles`` maps other role names,
``data.message_keys`` other key names. A row that cannot be converted is an error naming the file, row and field
(``data.bad_rows=error``), or is dropped and written to ``<run>/skipped_rows.jsonl`` (``data.bad_rows=skip``).

The conversion is one batched ``Dataset.map`` (``num_proc`` worker processes on large data). JSON Lines files are
read as lines by datasets' ``text`` builder and parsed row by row in that map: pyarrow's JSON reader refuses a
whole file for one row whose field has another type than the rest, and its errors do not name the line.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets, interleave_datasets
from omegaconf import DictConfig, OmegaConf

from qlora_lab import task
from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

# format -> the columns that identify it (checked in this order by auto-detection)
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "instruction": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's role names (and those of its common variants: LLaMA-Factory's function_call/observation, Gemini's
# "model") -> chat roles; data.roles adds to / overrides these.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
                  "function_call": "assistant", "tool": "tool", "observation": "tool", "function_response": "tool"}
# message keys kept besides role and content: what tool-calling chat templates read
MESSAGE_EXTRAS = ("tool_calls", "name", "tool_call_id")
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")
SUFFIXES = (*TEXT_SUFFIXES, ".parquet")
LINE = "_line"  # the column of raw JSON lines
# converted columns (the "kind" of a row: chat, text, blank (an empty line, dropped), error)
CONVERTED = ("kind", "chat", "train_from", "text", "row", "error", "raw", "source", "dropped_turns")
SMALL = 20_000  # fewer rows than this are converted in this process (worker processes cost ~1 s to start)


@dataclass
class Source:
    """One data source, resolved from ``data`` (or one entry of ``data.sources``)."""

    kind: str                      # "demo", "file" or "hub"
    path: str | None = None
    name: str | None = None        # hub configuration
    split: str = "train"
    eval_path: str | None = None
    weight: float = 1.0
    format: str = "auto"
    columns: dict | None = None
    roles: dict | None = None
    message_keys: dict | None = None
    label: str = ""                # how messages name it

    def files(self) -> list[Path]:
        if self.kind != "file":
            return []
        return [Path(p).expanduser() for p in (self.path, self.eval_path) if p]


@dataclass
class Splits:
    """Converted (not yet tokenized) train and held-out rows, with what happened to them."""

    train: Any
    eval: Any
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)


def sources(cfg: DictConfig) -> list[Source]:
    """The sources of the ``data`` config: one, or each entry of ``data.sources`` for a mixture."""
    common = dict(format=cfg.format, columns=_plain(cfg.columns), roles=_plain(cfg.roles),
                  message_keys=_plain(cfg.message_keys))
    if cfg.source == "demo":
        return [Source("demo", label="the demo task")]
    if cfg.source != "mixture":
        return [Source(cfg.source, path=cfg.path, name=cfg.name, split=cfg.split, eval_path=cfg.eval_path,
                       label=_label(cfg.source, cfg.path, cfg.split), **common)]
    out = []
    for i, s in enumerate(cfg.sources or []):
        s = {**common, **_plain(s)}
        kind = s.get("source") or ("file" if str(s["path"]).lower().endswith(SUFFIXES) else "hub")
        out.append(Source(kind, path=s["path"], name=s.get("name"), split=s.get("split", "train"),
                          eval_path=s.get("eval_path"), weight=float(s.get("weight", 1.0)), format=s["format"],
                          columns=s["columns"], roles=s["roles"], message_keys=s["message_keys"],
                          label=f"data.sources[{i}] " + _label(kind, s["path"], s.get("split", "train"))))
    return out


def _label(kind: str, path: str, split: str) -> str:
    return f"hub dataset {path!r} (split {split!r})" if kind == "hub" else str(Path(path).expanduser())


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def load_splits(cfg: DictConfig, num_proc: int | None = None, scratch: Path | None = None) -> Splits:
    """Train and held-out rows of every source (converted, not tokenized), mixed by weight for a mixture.

    ``scratch``: where datasets keeps the Arrow copies of the raw files and of the converted rows (default: under
    the cache root); prepare.py passes its staging folder, removed once the tokenized rows are written."""
    from qlora_lab.config import DataConfig

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)  # a run saved before a field existed: its default
    trains, evals, per_source, skipped = [], [], [], []
    srcs = sources(cfg)
    for index, src in enumerate(srcs):
        train, held, info, bad = _load_source(cfg, src, index, num_proc, scratch)
        trains.append(train)
        evals.append(held)
        per_source.append(info)
        skipped += bad
    bad_total = sum(s["skipped"] for s in per_source)
    if len(trains) == 1:
        train, held = trains[0], evals[0]
    else:
        weights = [s.weight for s in srcs]
        probabilities = [w / sum(weights) for w in weights]
        # datasets' own weighted interleaving: rows are drawn source by source with these probabilities until the
        # first source runs out, so the realised shares follow the weights (recorded below)
        train = interleave_datasets(trains, probabilities=probabilities, seed=cfg.seed,
                                    stopping_strategy="first_exhausted")
        held = concatenate_datasets(evals)
    if cfg.max_train_samples and cfg.source != "demo":
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples and cfg.source != "demo":
        held = held.select(range(min(cfg.max_eval_samples, len(held))))
    if len(per_source) > 1:
        counts = _count_by_source(train, len(per_source))
        for info, n in zip(per_source, counts):
            info["train_rows_mixed"] = n
            info["share"] = round(n / max(len(train), 1), 4)
        log.info("Mixture: %s", ", ".join(f"{s['label']} {s['train_rows_mixed']} rows ({100 * s['share']:.1f}%, "
                                           f"weight {s['weight']})" for s in per_source))
    stats = {"train_rows": len(train), "eval_rows": len(held), "skipped_rows": bad_total, "sources": per_source}
    log.info("Data: %d train / %d held-out rows from %s%s", len(train), len(held),
             " + ".join(f"{s['label']} ({s['format']})" for s in per_source),
             f"; {bad_total} bad row(s) skipped" if bad_total else "")
    return Splits(train, held, stats, skipped)


def _count_by_source(ds, n: int) -> list[int]:
    import numpy as np

    return np.bincount(column(ds, "source").astype(np.int64), minlength=n).tolist()


def column(ds, name: str):
    """One column of a Dataset as a numpy array, read as a whole (datasets 5's ``ds[name]`` is a lazy Column whose
    conversion to a list reads row by row: a minute per million rows)."""
    return ds.select_columns([name]).with_format("numpy")[:][name]


def task_rows(held, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` held-out conversations as prompt (every turn before the last assistant answer) / completion (that
    answer) rows, for the task score; none for plain-text data."""
    rows = []
    for chat in held.select(range(min(n, len(held))))[:]["chat"] if n else []:
        if chat is None:
            continue
        messages = json.loads(chat)
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


# --------------------------------------------------------------------------------------------------------------
# one source


def _load_source(cfg: DictConfig, src: Source, index: int, num_proc: int | None, scratch: Path | None):
    """(train, held-out, info, skipped rows) of one source."""
    if src.kind == "demo":
        n_train, n_eval = cfg.max_train_samples or 400, cfg.max_eval_samples or 48
        train = _convert(Dataset.from_list(task.demo_rows(n_train, "train", cfg.seed)), cfg, src, index,
                         "prompt_completion", 1)
        held = _convert(Dataset.from_list(task.demo_rows(n_eval, "eval", cfg.seed)), cfg, src, index,
                        "prompt_completion", 1)
        info = {"label": src.label, "format": "prompt_completion", "weight": src.weight, "rows": n_train + n_eval,
                "skipped": 0, "train_rows": n_train, "eval_rows": n_eval}
        return train.select_columns(["chat", "train_from", "text", "source"]), \
            held.select_columns(["chat", "train_from", "text", "source"]), info, []
    raw = _read(src, src.path, src.split, scratch)
    fmt = detect_format(raw, src)
    procs = _procs(num_proc, len(raw))
    converted = _convert(raw, cfg, src, index, fmt, procs)
    good, skipped = _check_rows(converted, cfg, src)
    if src.eval_path:  # a split of the same dataset (hub), or another file
        raw_eval = _read(src, src.path if src.kind == "hub" else src.eval_path,
                         src.eval_path if src.kind == "hub" else src.split, scratch)
        label = src.label if src.kind == "hub" else str(Path(src.eval_path).expanduser())
        eval_src = Source(**{**src.__dict__, "label": label})
        detect_format(raw_eval, eval_src, fmt)
        held, bad_eval = _check_rows(_convert(raw_eval, cfg, eval_src, index, fmt, _procs(num_proc, len(raw_eval))),
                                     cfg, eval_src)
        skipped += bad_eval
        train = good
    else:
        train, held = _holdout(good, cfg.eval_fraction, cfg.seed, src.label)
    cols = ["chat", "train_from", "text", "source"]
    info = {"label": src.label, "format": fmt, "weight": src.weight, "rows": len(converted), "skipped": len(skipped),
            "train_rows": len(train), "eval_rows": len(held)}
    return train.select_columns(cols), held.select_columns(cols), info, skipped


def _procs(num_proc: int | None, rows: int) -> int:
    if num_proc:
        return num_proc
    return 1 if rows < SMALL else max(1, min(os.cpu_count() or 1, 8))


def _holdout(ds, fraction: float, seed: int, origin: str):
    """(train, held-out): a seeded share of the rows held out; each part keeps the file's order."""
    if len(ds) < 2:
        raise UserError(f"{origin}: only {len(ds)} usable row(s); at least 2 are needed to hold one out for "
                        "evaluation (or pass data.eval_path=...).")
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(ds) * fraction)), len(ds) - 1)
    held = sorted(order[:n_eval])
    kept = sorted(order[n_eval:])
    return ds.select(kept), ds.select(held)


# --------------------------------------------------------------------------------------------------------------
# reading


def _read(src: Source, path: str, split: str, scratch: Path | None):
    """The raw rows of one file or hub split as a Dataset: a ``_line`` column for JSON files, columns otherwise."""
    if src.kind == "hub":
        return _read_hub(src, path, split, streaming=False)
    fp = Path(path).expanduser()
    if not fp.is_file():
        raise UserError(f"data file {path!r} not found (looked in {fp.resolve().parent}).")
    suffix = fp.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{fp}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet.")
    if suffix in TEXT_SUFFIXES:
        check_text_file(fp)
    from datasets import load_dataset

    if suffix == ".jsonl":
        ds = load_dataset("text", data_files=str(fp), split="train", cache_dir=_scratch(scratch))
        ds = ds.rename_column("text", LINE)
    elif suffix == ".json":
        rows = _read_json(fp)
        ds = Dataset.from_dict({LINE: [json.dumps(r, ensure_ascii=False) for r in rows]})
    else:
        try:
            ds = load_dataset(suffix[1:], data_files=str(fp), split="train", cache_dir=_scratch(scratch))
        except Exception as e:  # noqa: BLE001 - pyarrow/pandas raise many types for malformed files
            while (e.__cause__ or e.__context__) is not None:  # datasets wraps the parser's error, which has the row
                e = e.__cause__ or e.__context__
            raise UserError(f"{fp}: could not read as {suffix[1:]}: {type(e).__name__}: {str(e).strip()[:300]}. "
                            "Fix the file (quotes, separators, one row per line) or convert it to .jsonl.") from None
    if len(ds) == 0 or (LINE in ds.column_names and not any(line.strip() for line in ds[:1000][LINE])
                        and len(ds) <= 1000):
        raise UserError(f"{fp}: the file holds no rows. Add at least a few examples.")
    return ds


def _scratch(scratch: Path | None) -> str:
    """datasets' cache for the raw files' Arrow copies (under qlora_lab's cache root, not ~/.cache/huggingface)."""
    from qlora_lab.models import cache_root

    return str(scratch or cache_root() / "datasets")


def _read_hub(src: Source, path: str, split: str, streaming: bool):
    from datasets import load_dataset

    try:
        return load_dataset(path, src.name, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
        raise UserError(f"could not load hub dataset {path!r} (config {src.name!r}, split {split!r}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}\nFix: check the id and split, or "
                        "download it and use data=file data.path=...") from None


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


def file_digest(fp: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file's content (the cache key of data prepared from it); a progress bar for files of more than
    256 MiB (about a second per GiB)."""
    from qlora_lab.progress import bar

    h = hashlib.sha256()
    size = fp.stat().st_size
    progress = bar(total=size, desc=f"Hashing {fp.name}", unit="B") if size > 1 << 28 else None
    with fp.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress is not None:
                progress.update(len(block))
    if progress is not None:
        progress.close()
    return h.hexdigest()


def check_text_file(fp: Path, chunk: int = 1 << 24) -> None:
    """One clear error for a data file that is not UTF-8 text: a binary file given by mistake, or another encoding
    (latin-1, UTF-16), naming the line and byte of the first offending byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0
    with fp.open("rb") as f:
        head = f.read(8192)
        if b"\0" in head:
            raise UserError(f"{fp}: this is a binary file, not {fp.suffix} text (it holds NUL bytes). Check "
                            "data.path: it should name a UTF-8 text file of examples.")
        f.seek(0)
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                pos = max(e.start, 0)
                line = lines + block[:pos].count(b"\n") + 1
                raise UserError(f"{fp}: not UTF-8 text: byte {offset + pos} (line {line}) is 0x{block[pos]:02x}. "
                                "Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`).") from None
            offset += len(block)
            lines += block.count(b"\n")


# --------------------------------------------------------------------------------------------------------------
# formats


def detect_format(raw, src: Source, fmt: str | None = None) -> str:
    """The configured format, or the first one whose columns the first rows have; else a clear error."""
    fmt = fmt or src.format
    first = _first_row(raw, src)
    if first is None:
        return fmt if fmt != "auto" else "messages"  # every row is broken: the rows' own errors say how
    first = _rename(first, src.columns)
    found = sorted(first)
    keys = _keys(src)
    columns = dict(FORMAT_COLUMNS, messages=(keys["messages"],))
    if fmt != "auto":
        need = columns[fmt]
        if not all(c in first for c in need):
            raise UserError(f"{src.label}: data.format={fmt} needs column(s) {list(need)}, found {found}. Rename with "
                            f"data.columns={{old: new}} or pick another data.format.")
        return fmt
    for name, need in columns.items():
        if all(c in first for c in need):
            return name
    expected = "; ".join(f"{k}: {list(v)}" for k, v in columns.items())
    raise UserError(f"{src.label}: cannot tell the data format from columns {found}. Expected one of — {expected}. "
                    "Rename columns with data.columns={old: new} (e.g. data.columns={question:prompt,answer:completion}"
                    "), or name the chat column with data.message_keys={messages: dialog}.")


def _first_row(raw, src: Source) -> dict | None:
    if LINE not in raw.column_names:
        return dict(raw[0]) if len(raw) else None
    for line in raw.select(range(min(len(raw), 100)))[:][LINE]:
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                return row
    return None


def _keys(src: Source) -> dict[str, str]:
    """Key names of chat rows: the messages column and each message's role and content keys."""
    keys = {"messages": "messages", "role": "role", "content": "content"}
    keys.update(src.message_keys or {})
    return keys


def _rename(row: dict[str, Any], columns: dict | None) -> dict[str, Any]:
    """Apply data.columns ({old: new}) to a row."""
    if not columns:
        return row
    return {columns.get(k, k): v for k, v in row.items()}


class RowError(ValueError):
    """A row that cannot be converted; the message names the field."""


def _convert(raw, cfg: DictConfig, src: Source, index: int, fmt: str, num_proc: int):
    """Every row converted (``CONVERTED`` columns); failures are rows of kind "error" with their reason."""
    fn_kwargs = {"fmt": fmt, "system": cfg.system_prompt, "columns": src.columns, "keys": _keys(src),
                 "roles": {**(SHAREGPT_ROLES if fmt == "sharegpt" else {}), **(src.roles or {})},
                 "index": index, "is_lines": LINE in raw.column_names}
    return raw.map(_convert_batch, batched=True, batch_size=1000, with_indices=True, fn_kwargs=fn_kwargs,
                   remove_columns=raw.column_names, num_proc=num_proc if num_proc > 1 else None,
                   desc=f"Converting {Path(str(src.path)).name if src.path else 'rows'}" if len(raw) >= SMALL else None,
                   load_from_cache_file=False, new_fingerprint=_fingerprint(raw, fn_kwargs))


def _fingerprint(raw, fn_kwargs: dict) -> str:
    # datasets would hash the function and its arguments with dill to name its cache file; the inputs are known here
    return hashlib.sha256(f"{raw._fingerprint}{json.dumps(fn_kwargs, sort_keys=True, default=str)}".encode()
                          ).hexdigest()[:16]


def _convert_batch(batch: dict[str, list], indices: list[int], fmt: str, system: str | None, columns, keys, roles,
                   index: int, is_lines: bool) -> dict[str, list]:
    out = {k: [] for k in CONVERTED}
    names = list(batch)
    for j, i in enumerate(indices):
        raw, row = None, None
        kind, chat, train_from, text, error, dropped = "chat", None, 0, None, None, 0
        try:
            if is_lines:
                raw = batch[LINE][j]
                if not raw.strip():
                    kind = "blank"
                    raise StopIteration
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise RowError(f"malformed JSON ({e.msg} at column {e.colno}). Each line must be one JSON object, "
                                   "e.g. {\"prompt\": \"...\", \"completion\": \"...\"}") from None
                if not isinstance(row, dict):
                    raise RowError(f"expected a JSON object, got {type(row).__name__}")
            else:
                row = {k: batch[k][j] for k in names}
            row = _rename(row, columns)
            if fmt == "text":
                kind, text = "text", _text(row, "text")
            else:
                messages, train_from, dropped = convert_row(row, fmt, system, keys, roles)
                chat = json.dumps(messages, ensure_ascii=False)
        except StopIteration:
            pass
        except RowError as e:
            kind, error = "error", str(e)
            if raw is None:
                raw = json.dumps(row if row is not None else {k: batch[k][j] for k in names}, ensure_ascii=False,
                                 default=str)
        out["kind"].append(kind)
        out["chat"].append(chat)
        out["train_from"].append(train_from)
        out["text"].append(text)
        out["row"].append(i + 1)
        out["error"].append(error)
        out["raw"].append(raw if kind == "error" else None)
        out["source"].append(index)
        out["dropped_turns"].append(dropped)
    return out


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def _messages(value: Any, field_name: str, keys: dict, roles: dict) -> list[dict[str, Any]]:
    """``value`` checked and normalised to a list of {"role", "content"} chat messages."""
    if not isinstance(value, list) or not value:
        raise RowError(f"{field_name!r} must be a non-empty list of {{\"role\", \"content\"}} objects, got {value!r}")
    out = []
    role_key, content_key = keys["role"], keys["content"]
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError(f"{field_name}[{j}] must be an object with {role_key!r} and {content_key!r}, got {m!r}")
        role = m.get(role_key)
        role = roles.get(role, role)
        if role not in ROLES:
            raise RowError(f"{field_name}[{j}] has role {m.get(role_key)!r}, not one of {list(ROLES)}"
                           + (f"; map it with data.roles={{{m.get(role_key)}: user}} (or assistant, system, tool)"
                              if isinstance(m.get(role_key), str) else f" (key {role_key!r}; other key names: "
                              "data.message_keys={role: from, content: value})"))
        content = m.get(content_key)
        message = {"role": role, "content": content}
        for extra in MESSAGE_EXTRAS:
            if m.get(extra) is not None:
                message[extra] = m[extra]
        if content is None and "tool_calls" in message:
            message["content"] = ""
        elif not isinstance(content, str):
            raise RowError(f"{field_name}[{j}] must be {{\"role\": one of {list(ROLES)}, \"content\": string}}, got "
                           f"{m!r}")
        out.append(message)
    return out


def convert_row(row: dict[str, Any], fmt: str, system: str | None, keys: dict | None = None,
                roles: dict | None = None) -> tuple[list[dict[str, Any]], int, int]:
    """(messages, index of the first message that may be trained, trailing turns dropped after the last answer)
    for one row; :class:`RowError` if it cannot."""
    dropped = 0
    keys = keys or {"messages": "messages", "role": "role", "content": "content"}
    roles = roles or {}
    if fmt in ("messages", "sharegpt"):
        column = "conversations" if fmt == "sharegpt" else keys["messages"]
        if fmt == "sharegpt":
            keys = {"role": keys.get("role") if keys.get("role") != "role" else "from",
                    "content": keys.get("content") if keys.get("content") != "content" else "value"}
        messages = _messages(row.get(column), column, keys, roles)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise RowError(f"no assistant message in {column!r} (roles {[m['role'] for m in messages]}): nothing to "
                           "train on")
        dropped = len(messages) - last - 1
        messages = messages[: last + 1]  # turns after the last answer teach nothing
        train_from = 0
    elif fmt == "instruction":
        user = _text(row, "instruction")
        extra = row.get("input")
        if isinstance(extra, str) and extra.strip():
            user = f"{user}\n\n{extra}"
        messages, train_from = [{"role": "user", "content": user},
                                {"role": "assistant", "content": _text(row, "output")}], 1
    elif isinstance(row.get("prompt"), list):  # TRL's conversational prompt/completion: lists of messages
        prompt = _messages(row["prompt"], "prompt", keys, roles)
        completion = _messages(row.get("completion"), "completion", keys, roles)
        if [m["role"] for m in completion] != ["assistant"]:
            raise RowError(f"'completion' must be one assistant message, got roles {[m['role'] for m in completion]}")
        messages, train_from = prompt + completion, len(prompt)
    else:  # prompt_completion with plain strings
        messages, train_from = [{"role": "user", "content": _text(row, "prompt")},
                                {"role": "assistant", "content": _text(row, "completion")}], 1
    first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if all(m["role"] == "system" for m in messages[:first_answer]):
        raise RowError("nothing to answer: add the user's message before the assistant's answer")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
        train_from += 1
    return messages, train_from, dropped


def _check_rows(converted, cfg: DictConfig, src: Source):
    """(the good rows, the skipped ones) per data.bad_rows; blank lines are dropped silently."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kinds = converted.data.column("kind")
    n_bad = pc.sum(pc.equal(kinds, "error")).as_py() or 0
    n_blank = pc.sum(pc.equal(kinds, "blank")).as_py() or 0
    n_rows = len(converted) - n_blank
    if n_rows == 0:
        raise UserError(f"{src.label}: the file holds no rows. Add at least a few examples.")
    skipped: list[dict[str, Any]] = []
    if n_bad:
        bad = converted.select(pc.indices_nonzero(pc.equal(kinds, "error")).to_numpy().astype("int64"))
        first = bad[0]
        where = f"{src.label}:{first['row']}" if first["error"].startswith("malformed JSON") else \
            f"{src.label}, row {first['row']}"
        if cfg.bad_rows == "error":
            more = f" ({n_bad} bad rows in all)" if n_bad > 1 else ""
            raise UserError(f"{where}: {first['error']}.{more} Fix the row, or drop bad rows with data.bad_rows=skip "
                            "(each is written to <run>/skipped_rows.jsonl).")
        skipped = [{"source": src.label, "row": r["row"], "reason": r["error"], "raw": r["raw"]} for r in bad]
        share = n_bad / n_rows
        shown = "; ".join(f"row {s['row']}: {s['reason']}" for s in skipped[:3])
        if share > cfg.max_bad_fraction:
            raise UserError(f"{src.label}: {n_bad} of {n_rows} rows ({100 * share:.1f}%) cannot be used, more than "
                            f"data.max_bad_fraction={cfg.max_bad_fraction}. First: {shown}. Fix the data (or check "
                            "data.format / data.columns / data.roles), or raise data.max_bad_fraction.")
        log.warning("%s: %d of %d rows skipped (data.bad_rows=skip); first: %s", src.label, n_bad, n_rows, shown)
    trimmed = pc.sum(pc.greater(converted.data.column("dropped_turns"), 0)).as_py() or 0
    if trimmed:
        log.warning("%s: %d conversation(s) end after their last assistant answer (user or tool turns): those "
                    "trailing turns are dropped (nothing to train on in them)", src.label, trimmed)
    if n_bad or n_blank:
        usable = pc.is_in(kinds, pa.array(["chat", "text"]))
        converted = converted.select(pc.indices_nonzero(usable).to_numpy().astype("int64"))
    return converted, skipped
