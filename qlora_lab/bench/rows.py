"""Benchmark rows: chat rows of the demo task with few-shot examples, lengths spread over [seq_len/4, seq_len]
(and the same rows as preference pairs for the preference objectives' rows).

Real SFT data has rows of many lengths, so padding (and how a recipe avoids it) counts; the loss is on the last
answer only (prompt/completion), as in most instruction tuning. Deterministic for a given (seq_len, seed).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qlora_lab import task
from qlora_lab.errors import UserError


def bench_rows(tokenizer, n: int, seq_len: int, seed: int = 0, full: bool = False) -> list[dict]:
    """``n`` rows in the `messages` format, each at most ``seq_len`` tokens with the chat template applied;
    ``full``: each as close to ``seq_len`` as whole few-shot examples allow (bench.max_seq's probes)."""
    rng = random.Random(f"bench-{seq_len}-{seed}")
    pool = task.demo_rows(512, "train", seed)
    rows = []
    for _ in range(n):
        target = seq_len if full else rng.randint(max(seq_len // 4, 32), seq_len)
        question = rng.choice(pool)
        shots: list[dict] = []
        row = _row(question, shots)
        if _length(tokenizer, row) > seq_len:
            raise UserError(f"bench.seq_lens: {seq_len} tokens cannot hold a benchmark row (the shortest has "
                            f"{_length(tokenizer, row)} tokens with the chat template); use 256 or more.")
        if full:
            rows.append(_full_row(tokenizer, rng, pool, question, seq_len))
            continue
        while True:
            shot = rng.choice(pool)
            longer = _row(question, [*shots, shot])
            if _length(tokenizer, longer) > target:
                break
            shots.append(shot)
            row = longer
        rows.append(row)
    return rows


def preference_rows(rows: list[dict], seed: int = 0) -> list[dict]:
    """The rows as conversational prompt/chosen/rejected pairs: chosen = the row's answer, rejected = a plausible
    wrong one (as the embedded preference demo makes them), for the preference objectives' rows."""
    from qlora_lab.preference import wrong_answer

    rng = random.Random(f"bench-pairs-{seed}")
    return [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:],
             "rejected": [{"role": "assistant", "content": wrong_answer(r["messages"][-1]["content"], rng)}]}
            for r in rows]


def _full_row(tokenizer, rng: random.Random, pool: list[dict], question: dict, seq_len: int) -> dict:
    """A row of at most ``seq_len`` tokens, filled with few-shot examples counted by their own token lengths (rows
    of 64k tokens: re-tokenizing the whole row per added example, as bench_rows does, would be quadratic), then
    trimmed by whole examples until the real length fits."""
    used = _length(tokenizer, _row(question, []))
    shots: list[dict] = []
    while used < seq_len:
        shot = rng.choice(pool)
        used += len(tokenizer(f"{shot['prompt'].split(chr(10), 1)[1]}\nAnswer: {shot['completion']}\n\n",
                              add_special_tokens=False)["input_ids"])
        shots.append(shot)
    while shots and _length(tokenizer, _row(question, shots)) > seq_len:
        shots.pop()
    return _row(question, shots)


def _row(question: dict, shots: list[dict]) -> dict:
    examples = "".join(f"{s['prompt'].split(chr(10), 1)[1]}\nAnswer: {s['completion']}\n\n" for s in shots)
    prompt = f"{task.INSTRUCTION}\n\n{examples}{question['prompt'].split(chr(10), 1)[1]}\nAnswer:"
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": question["completion"]}]}


def _length(tokenizer, row: dict) -> int:
    return len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
