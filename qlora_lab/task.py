"""The embedded demo task and the held-out task score.

Demo task — structured extraction: turn a one-sentence profile into one exact JSON object, e.g.
    "Lena, who is 34, works as a nurse in Porto."  ->  {"name": "Lena", "age": 34, "city": "Porto", "job": "nurse"}
The sentences come from varied templates (the facts appear in different orders and wordings, the age sometimes as
"born N years ago"), so the model must read, not copy a fixed position. Held-out rows use names, cities and jobs
that never appear in training. A base instruct model of 135M parameters answers in prose or in a loose JSON
shape (score near 0); a few minutes of QLoRA teach the exact schema.

The score: greedy generation for held-out prompts, compared to the reference completion —
``json_match`` (parsed JSON objects equal) or ``exact_match`` (whitespace-trimmed strings equal).
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

INSTRUCTION = ('Extract the person\'s name, age, city and job from the text. Answer with one JSON object with the '
               'keys "name", "age", "city", "job" and nothing else.')

_NAMES = """Lena Omar Priya Jonas Mei Carlos Aiko Fatima Lukas Sofia Dmitri Amara Mateo Ingrid Kwame Yuki Elena
Rafael Nadia Tomas Chloe Hassan Greta Arjun Beatriz Felix Leila Oskar Ana Kenji Zara Pablo Hanna Ivan Noor Emil
Lucia Tariq Freya Diego Mira Anton Sana Hugo Alma Ravi Clara Marek Iris Kofi Vera Luca Ayla Nils Rosa Samir Ella
Bruno Dara Omari Julia Viktor Lina Andres Maya Stefan Asha Leon Nina Farid Ada Milo Tess Jamal Ines Pavel Ruth
Idris Cora Sven Eva Malik Nora Theo Isla Karim Lara Otto Selin Yara Igor Dalia Finn Maren Rohan Gia""".split()
_CITIES = """Porto Lyon Osaka Austin Krakow Nairobi Bergen Cusco Leeds Dublin Seville Busan Perth Tampere Bologna
Quebec Hanoi Izmir Graz Lagos Medellin Tartu Malmo Ghent Kochi Cork Turin Brno Sapporo Denver Fez Split Bilbao
Gdansk Accra Adelaide Utrecht Leipzig Tbilisi Valencia Hobart Riga Nantes Pune Halifax Aarhus Cordoba Salzburg
Lima Oslo Cebu Galway Zagreb Dresden Kyoto Boise Tunis Basel Bruges Dakar""".split()
_JOBS = """nurse teacher baker pilot chemist carpenter librarian architect farmer dentist plumber journalist
engineer florist translator lawyer painter electrician pharmacist mechanic tailor surgeon economist gardener
photographer chef geologist cashier welder designer biologist accountant potter sailor veterinarian""".split()

_TEMPLATES = [
    "{name}, who is {age}, works as a {job} in {city}.",
    "Meet {name}: a {age}-year-old {job} living in {city}.",
    "In {city}, {name} ({age}) has a job as a {job}.",
    "{name} is a {job} from {city} and is {age} years old.",
    "Born {age} years ago, {name} now works as a {job} in {city}.",
    "The {job} {name}, aged {age}, moved to {city} last spring.",
    "At {age}, {name} runs a small business in {city} as a {job}.",
    "{city} is home to {name}, a {job} who turned {age} this year.",
    "Our new neighbour {name} is {age}; she is a {job} and grew up in {city}.",
    "Ask anyone in {city} about {name}: the {age}-year-old {job} knows everyone.",
]


def _split(items: list[str], eval_share: float = 0.25) -> tuple[list[str], list[str]]:
    cut = int(len(items) * (1 - eval_share))
    return items[:cut], items[cut:]


def demo_rows(n: int, split: str, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` deterministic prompt/completion rows of the demo task; train and eval use disjoint vocabularies."""
    idx = 0 if split == "train" else 1
    names, cities, jobs = (_split(x)[idx] for x in (_NAMES, _CITIES, _JOBS))
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for _ in range(n):
        fact = {"name": rng.choice(names), "age": rng.randint(19, 79), "city": rng.choice(cities),
                "job": rng.choice(jobs)}
        text = rng.choice(_TEMPLATES).format(**fact)
        rows.append({"prompt": f"{INSTRUCTION}\nText: {text}", "completion": json.dumps(fact)})
    return rows


# --------------------------------------------------------------------------------------------------------------
# scoring


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None


def score_answer(metric: str, answer: str, reference: str) -> bool:
    if metric == "json_match":
        got = _parse_json(answer)
        return got is not None and got == _parse_json(reference)
    return answer.strip() == reference.strip()


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[Any], max_new_tokens: int, batch_size: int = 16,
                     desc: str = "Generating answers") -> list[str]:
    """Greedy answers for ``prompts`` (chat message lists or plain strings), batched with left padding; a progress
    bar counts the answers (a batch of the embedded model on 2 CPU cores takes tens of seconds)."""
    from qlora_lab.progress import bar

    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    answers: list[str] = []
    progress = bar(total=len(prompts), desc=desc, unit="answer")
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            if isinstance(chunk[0], list):
                texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in chunk]
            else:
                texts = chunk
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            progress.update(len(chunk))
    finally:
        progress.close()
        tokenizer.padding_side = side
    return answers


def task_score(model, tokenizer, rows: list[dict[str, Any]], metric: str, max_new_tokens: int) -> dict[str, Any]:
    """Score ``rows`` (prompt/completion, conversational or plain) with greedy generation."""
    prompts = [r["prompt"] for r in rows]
    refs = [r["completion"][-1]["content"] if isinstance(r["completion"], list) else r["completion"] for r in rows]
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    started = time.perf_counter()
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, desc=f"Scoring held-out answers ({metric})")
    if was_training:
        model.train()
    if use_cache is not None:
        model.config.use_cache = use_cache
    hits = [score_answer(metric, a, ref) for a, ref in zip(answers, refs)]
    log.info("Scored %d held-out answers: %s %.3f (%d right) in %.1f s", len(hits), metric,
             sum(hits) / max(len(hits), 1), sum(hits), time.perf_counter() - started)
    examples = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "answer": a, "reference": ref, "ok": h}
                for p, a, ref, h in zip(prompts[:3], answers[:3], refs[:3], hits[:3])]
    return {"score": sum(hits) / max(len(hits), 1), "n": len(hits), "metric": metric, "examples": examples}


def encode_chat_rows(tokenizer, rows: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """``rows`` (plain prompt/completion strings) as one-turn chats in the tokenizer's template, labels on the answer
    only: what training's prompt/completion rows become, for :func:`heldout_loss` outside a run (the bench)."""
    out = []
    for r in rows:
        user = [{"role": "user", "content": r["prompt"]}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": r["completion"]}],
                                             tokenize=True, return_dict=False)
        out.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt):]})
    return out


@torch.no_grad()
def heldout_loss(model, encoded) -> float:
    """Mean cross-entropy per scored token (labels != -100) over the encoded held-out rows, one row at a time.

    Per token over the whole set, which is what the Trainer's eval loss is when every batch holds the same number
    of scored tokens; with uneven rows the two differ slightly, so compare bases with this number, not with the
    run's eval_loss."""
    total, count = 0.0, 0
    for row in encoded:
        ids = torch.tensor([row["input_ids"]], device=model.device)
        labels = torch.tensor([row["labels"]], device=model.device)[:, 1:]
        logits = model(input_ids=ids).logits[:, :-1].float()
        mask = labels != -100
        if mask.any():
            total += torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum").item()
            count += int(mask.sum())
    return round(total / max(count, 1), 5)
