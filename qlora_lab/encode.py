"""Conversations rendered through the model's chat template, tokenized, with the trained tokens marked.

``labels`` are the token ids where the loss is computed and -100 elsewhere (what TRL's collator and the model's loss
read). What is trained (``data.train_on``):
- ``all_assistant`` (default): every assistant turn at or after the row's ``train_from`` — its content and the
  template's end-of-turn scaffolding after it (e.g. ``<|im_end|>\\n``), which is how the model learns to stop; the
  system, user and tool turns and the header before each answer are masked,
- ``last_assistant``: only the final assistant turn (the prompt/completion view of a chat),
- ``all``: every token of the conversation.
Plain-text rows train every token, with the EOS appended as TRL does.

How the spans are found. TRL's own rule for one prompt/completion pair is: the completion starts where the tokenized
``prompt + generation prompt`` and the tokenized full conversation diverge (trl/trainer/sft_trainer.py,
``common_prefix_length``), and runs to the end. For every assistant turn ``i`` the same rule gives the character
span ``[len(render(messages[:i], add_generation_prompt=True)), len(render(messages[:i+1])))`` of the full rendering.
Rendering every prefix costs one template render per turn, so the span is first looked up in the full rendering:
the answer's text preceded by the template's generation prompt and followed by its end-of-turn text, both learnt
once per template from a probe conversation. Rows where that lookup fails (templates that rewrite earlier turns,
tool calls) take the per-prefix rule. The character spans become token spans with the fast tokenizer's
``char_to_token``, on one tokenization of the full text. transformers' ``return_assistant_tokens_mask`` would do this
from ``{% generation %}`` markers, which most shipped templates (SmolLM2's, Llama's, Qwen2.5's) do not have.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

TRAIN_ON = ("all_assistant", "last_assistant", "all")
COLUMNS = ("input_ids", "labels", "length", "full_length", "trained")
_PROBE_USER, _PROBE_ANSWER = "\x02qlora-user\x03", "\x02qlora-answer\x03"


def features(keep: tuple[str, ...] = ()):
    """Arrow types of encoded rows: 32-bit ids (half the size on disk and in the page cache of int64)."""
    from datasets import Features, Sequence, Value

    return Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "length": Value("int32"), "full_length": Value("int32"), "trained": Value("int32"),
                     **{k: Value("string") for k in keep}})


def template_probe(tokenizer) -> dict[str, str] | None:
    """The template's generation prompt and end-of-turn text around an answer, or None when the template does not
    render a one-turn chat as ``render(prompt, add_generation_prompt=True) + answer + end``."""
    if tokenizer.chat_template is None:
        return None
    user = [{"role": "user", "content": _PROBE_USER}]
    try:
        with_gen = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(user, tokenize=False)
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": _PROBE_ANSWER}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this probe takes the per-prefix rule
        return None
    at = full.find(_PROBE_ANSWER)
    if at < 0 or full[:at] != with_gen or not with_gen.startswith(without):
        return None
    return {"gen": with_gen[len(without):], "end": full[at + len(_PROBE_ANSWER):]}


def encode_batch(batch: dict[str, list], tokenizer, train_on: str, max_length: int | None, keep_end: bool,
                 probe: dict[str, str] | None, keep: tuple[str, ...] = ()) -> dict[str, list]:
    """Tokenized rows with labels (and the ``keep`` columns as they were); rows left without a trained token after
    truncation are dropped."""
    out: dict[str, list] = {k: [] for k in (*COLUMNS, *keep)}
    chats = [(j, json.loads(c)) for j, c in enumerate(batch["chat"]) if c is not None]
    texts = [(j, t) for j, t in enumerate(batch["text"]) if t is not None]
    encoded: dict[int, tuple[list[int], list[int]]] = {}
    if chats:
        rendered = _render(tokenizer, [m for _, m in chats])
        enc = tokenizer(rendered, add_special_tokens=False)
        for b, ((j, messages), full) in enumerate(zip(chats, rendered)):
            ids = enc["input_ids"][b]
            if train_on == "all":
                encoded[j] = (ids, list(ids))
                continue
            labels = [-100] * len(ids)
            for start, end in answer_spans(tokenizer, messages, full, batch["train_from"][j], train_on, probe):
                a, z = _token_range(enc, b, start, end, len(full))
                labels[a:z] = ids[a:z]
            encoded[j] = (ids, labels)
    if texts:
        eos = tokenizer.eos_token or ""
        enc = tokenizer([t if t.endswith(eos) else t + eos for _, t in texts])
        for b, (j, _) in enumerate(texts):
            ids = enc["input_ids"][b]
            encoded[j] = (ids, list(ids))
    for j in sorted(encoded):
        ids, labels = encoded[j]
        full_length = len(ids)
        if max_length is not None and len(ids) > max_length:
            cut = slice(-max_length, None) if keep_end else slice(None, max_length)
            ids, labels = ids[cut], labels[cut]
        trained = sum(1 for t in labels if t != -100)
        if trained == 0:
            continue  # nothing left to learn from (the answer lies past max_length)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["full_length"].append(full_length)
        out["trained"].append(trained)
        for k in keep:
            out[k].append(batch[k][j])
    return out


def _render(tokenizer, conversations: list[list[dict[str, Any]]]) -> list[str]:
    try:
        return tokenizer.apply_chat_template(conversations, tokenize=False)
    except Exception:  # noqa: BLE001 - find the row the template refuses, and say which
        for messages in conversations:
            try:
                tokenizer.apply_chat_template(messages, tokenize=False)
            except Exception as e:  # noqa: BLE001 - jinja's TemplateError and whatever the template raises
                raise UserError(f"the model's chat template refuses a conversation ({type(e).__name__}: {e}); roles "
                                f"{[m['role'] for m in messages]}. Fix the data (many templates need alternating "
                                "user/assistant turns, or no system turn), or use data.format=text.") from None
        raise


def answer_spans(tokenizer, messages: list[dict[str, Any]], full: str, train_from: int, train_on: str,
                 probe: dict[str, str] | None) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``full`` (the rendered conversation) that are trained."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= train_from]
    if train_on == "last_assistant":
        turns = turns[-1:]
    spans = _spans_by_lookup(messages, full, turns, probe) if probe else None
    if spans is None:
        spans = [_span_by_prefixes(tokenizer, messages, full, i) for i in turns]
    return spans


def _spans_by_lookup(messages, full: str, turns: list[int], probe: dict[str, str]) -> list[tuple[int, int]] | None:
    gen, end = probe["gen"], probe["end"]
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if "tool_calls" in m or not m["content"]:
            return None
        found = None
        for content in dict.fromkeys((m["content"], m["content"].strip())):  # some templates trim the content
            at = full.find(content, cursor)
            while at >= 0 and not (at >= len(gen) and full.startswith(gen, at - len(gen))
                                   and full.startswith(end, at + len(content))):
                at = full.find(content, at + 1)
            if at >= 0:
                found = (at, at + len(content) + len(end))
                break
        if found is None:
            return None
        if i in turns:
            spans.append(found)
        cursor = found[1]
    return spans


def _span_by_prefixes(tokenizer, messages, full: str, i: int) -> tuple[int, int]:
    prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
    start = _common_prefix(prompt, full)
    if i == len(messages) - 1:
        return start, len(full)
    through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
    return start, max(start, _common_prefix(through, full))


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first difference
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _token_range(enc, b: int, start: int, end: int, n_chars: int) -> tuple[int, int]:
    """Token indices ``[a, z)`` covering the characters ``[start, end)`` of row ``b``."""
    a = None
    for c in range(start, min(end, n_chars)):
        a = enc.char_to_token(b, c)
        if a is not None:
            break
    z = None
    for c in range(min(end, n_chars) - 1, start - 1, -1):
        z = enc.char_to_token(b, c)
        if z is not None:
            break
    if a is None or z is None:
        return 0, 0
    return a, z + 1


def summary(ds) -> dict[str, Any]:
    """Token statistics of an encoded dataset: length percentiles, truncated rows, trained-token share."""
    from qlora_lab.data import column

    if len(ds) == 0:
        return {"rows": 0}
    import numpy as np

    lengths, full, trained = (column(ds, c).astype(np.int64) for c in ("length", "full_length", "trained"))
    pct = {f"p{p}": int(np.percentile(full, p)) for p in (50, 90, 99)}
    return {"rows": int(len(ds)), "tokens": int(lengths.sum()), "length_before_truncation": {**pct,
            "max": int(full.max())}, "truncated_rows": int((full > lengths).sum()),
            "trained_tokens": int(trained.sum()), "trained_share": round(float(trained.sum() / lengths.sum()), 4)}


def trained_spans(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    """The decoded runs of trained tokens of one encoded row, in order."""
    spans, run = [], []
    for t, label in zip(ids, labels):
        if label != -100:
            run.append(t)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def marked(ids: list[int], labels: list[int], tokenizer, on: str = "[[", off: str = "]]") -> str:
    """The row's text with each trained run wrapped in ``on``/``off`` markers."""
    parts, run, trained = [], [], None
    for t, label in zip(ids, labels):
        state = label != -100
        if trained is not None and state != trained:
            parts.append((trained, tokenizer.decode(run)))
            run = []
        run.append(t)
        trained = state
    if run:
        parts.append((trained, tokenizer.decode(run)))
    return "".join(f"{on}{text}{off}" if is_trained else text for is_trained, text in parts)
