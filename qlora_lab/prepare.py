"""Data preparation — load, convert, tokenize, mask — cached; and the `qlora-lab prepare` / `inspect` commands.

``prepare(cfg, tokenizer, run_dir)`` gives the trainer its rows: ``input_ids`` and ``labels`` (-100 where no loss is
computed), truncated to ``trainer.max_length``, as memory-mapped Arrow files. The result is cached under
``<cache root>/data/<key>/`` (``$QLORA_LAB_CACHE`` or ``~/.cache/qlora_lab``), where the key is a hash of everything
that changes the tokens: the data files' content (sha256), hub ids/splits, the tokenizer (vocabulary, chat template,
special tokens), every ``data`` setting that changes rows, and ``trainer.max_length`` / ``truncation_mode``. A second
run, a resumed run and every job of a sweep with the same data reuse it ("prepared data from cache");
``qlora-lab prepare`` fills it ahead of a sweep. A cache entry is written to a temporary folder and renamed when
complete, so an interrupted preparation leaves nothing half-written behind.

``data.streaming=true`` streams the rows instead (hub datasets too large to download, huge local files): converted
and tokenized on the fly as training reads them, nothing cached, ``trainer.max_steps`` required.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from qlora_lab import data, encode
from qlora_lab.config import CONF_DIR, register_configs
from qlora_lab.errors import UserError, exit_on_user_error
from qlora_lab.files import write_json_atomic, write_text_atomic
from qlora_lab.validate import validate

log = logging.getLogger(__name__)

# Bump when the prepared rows change for the same inputs (the encoding rules, the columns): old entries are not used.
VERSION = 1
# data fields that do not change the prepared rows (so not in the cache key)
NOT_IN_KEY = ("task_metric", "task_eval_samples", "max_new_tokens", "cache", "num_proc", "streaming")
SKIPPED_ROWS = "skipped_rows.jsonl"
DATA_INFO = "data.json"


@dataclass
class Prepared:
    """What the trainer gets: encoded train and held-out rows, the held-out rows to score, and the numbers."""

    train: Any                      # datasets.Dataset (IterableDataset when streaming)
    eval: Any
    task_rows: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False


def prepare(cfg: DictConfig, tokenizer, run_dir: Path | None = None, task_samples: int | None = None) -> Prepared:
    """The encoded rows of ``cfg`` (a composed train config), from the cache when it holds them."""
    task_samples = cfg.data.task_eval_samples if task_samples is None else task_samples
    if cfg.data.get("streaming"):
        prepared = _prepare_streaming(cfg, tokenizer, task_samples)
    else:
        prepared = _prepare_cached(cfg, tokenizer, task_samples)
    if run_dir is not None:
        write_json_atomic(run_dir / DATA_INFO, prepared.stats)
        skipped = prepared.stats.get("skipped_rows_file")
        if skipped:
            shutil.copyfile(skipped, run_dir / SKIPPED_ROWS)
            log.warning("%d skipped row(s) are listed in %s", prepared.stats["skipped_rows"], run_dir / SKIPPED_ROWS)
    return prepared


def cache_key(cfg: DictConfig, tokenizer) -> str:
    """Hash of everything that changes the prepared rows (see the module docstring)."""
    d = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in NOT_IN_KEY}
    files = {}
    for src in data.sources(cfg.data):
        for fp in src.files():
            if fp.is_file():
                files[str(fp.resolve())] = data.file_digest(fp)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = {"version": VERSION, "data": d, "files": files,
             "tokenizer": {"class": type(tokenizer).__name__, "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
                           "chat_template": tokenizer.chat_template, "special": tokenizer.special_tokens_map},
             "max_length": cfg.trainer.max_length, "truncation_mode": cfg.trainer.truncation_mode}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_dir() -> Path:
    """Where prepared data is cached: ``$QLORA_LAB_DATA_CACHE``, else ``data/`` under the cache root."""
    from qlora_lab.models import cache_root

    return Path(os.environ.get("QLORA_LAB_DATA_CACHE") or cache_root() / "data")


def _prepare_cached(cfg: DictConfig, tokenizer, task_samples: int) -> Prepared:
    started = time.time()
    key = cache_key(cfg, tokenizer)
    entry = cache_dir() / key
    if cfg.data.cache and (entry / "meta.json").is_file():
        prepared = _load_entry(entry, task_samples)
        log.info("Prepared data from cache (%s): %d train / %d held-out rows, %.1f s", entry,
                 len(prepared.train), len(prepared.eval), time.time() - started)
        return prepared
    log.info("Preparing the data (read, convert, tokenize through the chat template, mask); cached for later runs")
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.tmp.", dir=entry.parent))
    try:
        splits = data.load_splits(cfg.data, cfg.data.num_proc, staging / "raw")
        probe = encode.template_probe(tokenizer)
        _check_template(tokenizer, splits)
        train = _encode(splits.train, tokenizer, cfg, probe, staging / "train.arrow", ())
        held = _encode(splits.eval, tokenizer, cfg, probe, staging / "eval.arrow", ("chat",))
        stats = {**splits.stats, "cache_key": key,
                 "dropped_without_trained_tokens": {"train": len(splits.train) - len(train),
                                                    "eval": len(splits.eval) - len(held)},
                 "train_tokens": encode.summary(train), "eval_tokens": encode.summary(held),
                 "train_on": cfg.data.train_on, "max_length": cfg.trainer.max_length,
                 "prepare_seconds": round(time.time() - started, 2)}
        stats["train_rows"], stats["eval_rows"] = len(train), len(held)
        if splits.skipped:
            with (staging / SKIPPED_ROWS).open("w", encoding="utf-8") as f:
                for row in splits.skipped:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        write_json_atomic(staging / "meta.json", stats)
        del train, held, splits
        shutil.rmtree(staging / "raw", ignore_errors=True)  # the raw files' and converted rows' Arrow copies
        if entry.exists() and not cfg.data.cache:
            shutil.rmtree(entry, ignore_errors=True)  # data.cache=false: this preparation replaces the old one
        try:
            os.replace(staging, entry)
        except OSError:  # another process (a rank, a sweep job) prepared the same data meanwhile: theirs is used
            if not (entry / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log_dropped(stats, cfg)
    prepared = _load_entry(entry, task_samples)
    prepared.from_cache = False
    log.info("Prepared data in %.1f s: %d train / %d held-out rows (cached as %s)", time.time() - started,
             len(prepared.train), len(prepared.eval), entry)
    return prepared


def _encode(ds, tokenizer, cfg: DictConfig, probe, path: Path, keep: tuple[str, ...]):
    procs = data._procs(cfg.data.num_proc, len(ds))
    return ds.map(encode.encode_batch, batched=True, batch_size=500, remove_columns=ds.column_names,
                  features=encode.features(keep), num_proc=procs if procs > 1 else None,
                  fn_kwargs={"tokenizer": tokenizer, "train_on": cfg.data.train_on,
                             "max_length": cfg.trainer.max_length, "probe": probe, "keep": keep,
                             "keep_end": cfg.trainer.truncation_mode == "keep_end"},
                  cache_file_name=str(path), load_from_cache_file=False,
                  new_fingerprint=hashlib.sha256(str(path).encode()).hexdigest()[:16],
                  desc=f"Tokenizing {path.stem} rows" if len(ds) >= data.SMALL else None)


def _load_entry(entry: Path, task_samples: int) -> Prepared:
    from datasets import Dataset, concatenate_datasets

    def load(stem: str):
        files = sorted(entry.glob(f"{stem}*.arrow"))
        if not files:
            raise UserError(f"the data cache entry {entry} is incomplete (no {stem} rows). Delete it and rerun.")
        parts = [Dataset.from_file(str(f)) for f in files]
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)

    stats = json.loads((entry / "meta.json").read_text())
    train, held = load("train"), load("eval")
    skipped = entry / SKIPPED_ROWS
    stats["skipped_rows_file"] = str(skipped) if skipped.is_file() else None
    return Prepared(train, held, data.task_rows(held, task_samples), stats, from_cache=True)


def _check_template(tokenizer, splits) -> None:
    if tokenizer.chat_template is None and any(c is not None for c in splits.train.select(
            range(min(len(splits.train), 50)))[:]["chat"]):
        raise UserError("the model's tokenizer has no chat template, so chat rows cannot be rendered. Use a chat "
                        "(instruct) model, or plain text rows (data.format=text).")


def _log_dropped(stats: dict[str, Any], cfg: DictConfig) -> None:
    dropped = stats["dropped_without_trained_tokens"]
    if dropped["train"] or dropped["eval"]:
        log.warning("%d train / %d held-out row(s) dropped: no trained token left after truncation to "
                    "trainer.max_length=%s (raise it, or use trainer.truncation_mode=keep_end)", dropped["train"],
                    dropped["eval"], cfg.trainer.max_length)
    if not stats["train_rows"]:
        raise UserError(f"no training example has a trainable token left after truncation to trainer.max_length="
                        f"{cfg.trainer.max_length} (the answer starts after that many tokens in every row). Raise "
                        "trainer.max_length or shorten the prompts.")


# --------------------------------------------------------------------------------------------------------------
# streaming


def _prepare_streaming(cfg: DictConfig, tokenizer, task_samples: int) -> Prepared:
    """Rows converted and tokenized as training reads them (datasets' IterableDataset); the held-out rows are the
    eval file/split, or the first rows of the stream (held out from training)."""
    from datasets import Dataset, interleave_datasets

    d = cfg.data
    probe = encode.template_probe(tokenizer)
    streams, evals = [], []
    srcs = data.sources(d)
    for index, src in enumerate(srcs):
        stream = _stream(src, src.path, src.split)
        fmt = d.format if d.format != "auto" else _detect_streamed(stream, src)
        stream = _convert_stream(stream, cfg, src, index, fmt)
        if src.eval_path:
            held = _convert_stream(_stream(src, src.path if src.kind == "hub" else src.eval_path,
                                          src.eval_path if src.kind == "hub" else src.split), cfg, src, index, fmt)
            held = list(held.take(d.max_eval_samples or 256))
        else:
            n_eval = d.max_eval_samples or 256
            held, stream = list(stream.take(n_eval)), stream.skip(n_eval)
        streams.append(stream)
        evals += held
    weights = [s.weight for s in srcs]
    train = streams[0] if len(streams) == 1 else interleave_datasets(
        streams, probabilities=[w / sum(weights) for w in weights], seed=d.seed, stopping_strategy="first_exhausted")
    fn_kwargs = {"tokenizer": tokenizer, "train_on": d.train_on, "max_length": cfg.trainer.max_length,
                 "probe": probe, "keep_end": cfg.trainer.truncation_mode == "keep_end"}
    train = train.map(encode.encode_batch, batched=True, batch_size=256, fn_kwargs=fn_kwargs,
                      remove_columns=["chat", "train_from", "text", "source"])
    held_ds = Dataset.from_list(evals) if evals else None
    if held_ds is None or len(held_ds) == 0:
        raise UserError("data.streaming=true: no held-out rows could be read (the stream is empty?).")
    held_enc = held_ds.map(encode.encode_batch, batched=True, fn_kwargs={**fn_kwargs, "keep": ("chat",)},
                           remove_columns=held_ds.column_names, features=encode.features(("chat",)))
    stats = {"streaming": True, "eval_rows": len(held_enc), "eval_tokens": encode.summary(held_enc),
             "sources": [{"label": s.label, "weight": s.weight} for s in srcs], "skipped_rows": 0}
    log.info("Data: streamed training rows from %s; %d held-out rows", " + ".join(s.label for s in srcs),
             len(held_enc))
    return Prepared(train, held_enc, data.task_rows(held_enc, task_samples), stats)


def _stream(src: data.Source, path: str, split: str):
    if src.kind == "hub":
        return data._read_hub(src, path, split, streaming=True)
    from datasets import load_dataset

    fp = Path(path).expanduser()
    if not fp.is_file():
        raise UserError(f"data file {path!r} not found (looked in {fp.resolve().parent}).")
    suffix = fp.suffix.lower()
    if suffix in data.TEXT_SUFFIXES:
        data.check_text_file(fp)
    if suffix == ".jsonl":
        return load_dataset("text", data_files=str(fp), split="train", streaming=True).rename_column("text", data.LINE)
    if suffix in (".csv", ".parquet"):
        return load_dataset(suffix[1:], data_files=str(fp), split="train", streaming=True)
    raise UserError(f"{fp}: data.streaming=true reads .jsonl, .csv, .parquet files or hub datasets; load a .json "
                    "array without streaming, or convert it to .jsonl.")


def _detect_streamed(stream, src: data.Source) -> str:
    from datasets import Dataset

    return data.detect_format(Dataset.from_list(list(stream.take(20))), src)


def _convert_stream(stream, cfg: DictConfig, src: data.Source, index: int, fmt: str):
    d = cfg.data
    fn_kwargs = {"fmt": fmt, "system": d.system_prompt, "columns": src.columns, "keys": data._keys(src),
                 "roles": {**(data.SHAREGPT_ROLES if fmt == "sharegpt" else {}), **(src.roles or {})},
                 "index": index, "is_lines": True}
    first = next(iter(stream.take(1)), {})
    fn_kwargs["is_lines"] = data.LINE in first
    converted = stream.map(data._convert_batch, batched=True, with_indices=True, fn_kwargs=fn_kwargs,
                           remove_columns=list(first))
    policy = d.bad_rows

    def usable(row):
        if row["kind"] == "error":
            if policy == "error":
                raise UserError(f"{src.label}, row {row['row']}: {row['error']}. Fix the row, or drop bad rows with "
                                "data.bad_rows=skip.")
            log.warning("%s, row %d skipped: %s", src.label, row["row"], row["error"])
        return row["kind"] in ("chat", "text")

    return converted.filter(usable).select_columns(["chat", "train_from", "text", "source"])


# --------------------------------------------------------------------------------------------------------------
# the commands: `qlora-lab prepare` (fill the cache) and `qlora-lab inspect` (look at what will be trained)


def run(cfg: DictConfig, show_rows: int) -> dict[str, Any]:
    """Prepare the data of ``cfg`` (same groups and overrides as train); print the summary and ``show_rows`` rows."""
    from qlora_lab import models

    validate(cfg)
    tokenizer = models.build_tokenizer(cfg.model, models.resolve_model_path(cfg.model.name_or_path))
    prepared = prepare(cfg, tokenizer, task_samples=0)
    shown = _rows(prepared.train, tokenizer, show_rows)
    print(describe(prepared.stats, cfg), flush=True)
    if shown:
        on, off = ("\x1b[1;32m", "\x1b[0m") if sys.stdout.isatty() else ("[[", "]]")
        print(f"\nFirst {len(shown)} training row(s), through the chat template; trained tokens marked {on}like "
              f"this{off}:")
        for i, row in enumerate(shown, 1):
            print(f"\n--- row {i} ({row['tokens']} tokens, {row['trained_tokens']} trained) ---")
            print(encode.marked(row["input_ids"], row["labels"], tokenizer, on, off))
    out = {"summary": prepared.stats, "rows": [{"text": tokenizer.decode(r["input_ids"]), "trained": r["trained"],
                                                "tokens": r["tokens"], "trained_tokens": r["trained_tokens"]}
                                               for r in shown]}
    if cfg.inspect.json:
        write_text_atomic(Path(cfg.inspect.json).expanduser(), json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        print(f"\nwritten: {cfg.inspect.json}")
    return out


def _rows(ds, tokenizer, n: int) -> list[dict[str, Any]]:
    rows = list(ds.take(n)) if not hasattr(ds, "select") else ds.select(range(min(n, len(ds)))).to_list()
    return [{"input_ids": r["input_ids"], "labels": r["labels"], "tokens": len(r["input_ids"]),
             "trained_tokens": sum(1 for t in r["labels"] if t != -100),
             "trained": encode.trained_spans(r["input_ids"], r["labels"], tokenizer)} for r in rows]


def describe(stats: dict[str, Any], cfg: DictConfig) -> str:
    """The data summary as a few lines of text."""
    lines = [f"Data: {stats.get('train_rows', 'streamed')} train / {stats['eval_rows']} held-out rows"
             f" (data.train_on={cfg.data.train_on}){'; streamed' if stats.get('streaming') else ''}"]
    lines.append(f"  {'source':<48} {'format':<18} {'rows':>8} {'skipped':>8} {'train':>8} {'eval':>6} {'share':>6}")
    for s in stats.get("sources", []):
        share = f"{100 * s['share']:.1f}%" if "share" in s else "100%"
        lines.append(f"  {s['label'][-48:]:<48} {s.get('format', '?'):<18} {s.get('rows', '?'):>8} "
                     f"{s.get('skipped', 0):>8} {s.get('train_rows_mixed', s.get('train_rows', '?')):>8} "
                     f"{s.get('eval_rows', '?'):>6} {share:>6}")
    for split in ("train", "eval"):
        t = stats.get(f"{split}_tokens")
        if not t or not t.get("rows"):
            continue
        pct = t["length_before_truncation"]
        lines.append(f"  {split} tokens: length p50 {pct['p50']}, p90 {pct['p90']}, p99 {pct['p99']}, max {pct['max']};"
                     f" truncated by trainer.max_length={cfg.trainer.max_length}: {t['truncated_rows']} row(s); "
                     f"trained {t['trained_tokens']:,} of {t['tokens']:,} tokens ({100 * t['trained_share']:.1f}%)")
    dropped = stats.get("dropped_without_trained_tokens") or {}
    if any(dropped.values()):
        lines.append(f"  dropped (no trained token left after truncation): {dropped['train']} train, "
                     f"{dropped['eval']} held-out")
    if stats.get("skipped_rows"):
        lines.append(f"  skipped bad rows: {stats['skipped_rows']} (data.bad_rows=skip; listed in "
                     f"{stats.get('skipped_rows_file')})")
    return "\n".join(lines)


register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prepare")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg, show_rows=0)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prepare")
@exit_on_user_error
def inspect_main(cfg: DictConfig) -> None:
    run(cfg, show_rows=cfg.inspect.rows)
