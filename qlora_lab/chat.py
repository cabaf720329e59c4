"""`qlora-lab chat`: talk to a run (its adapter on the base, in the training quantization) or a merged folder.

The model's chat template is applied; tokens stream as they are generated; decoding is greedy unless
``do_sample=true``. The prompt comes from ``prompt=...``, from standard input (``echo ... | qlora-lab chat run=R``:
all of it, one prompt), or from ``prompt_file=PATH`` (many, answered into a JSONL file); without any of them a
terminal gets the interactive chat. Hydra's override parser reads commas, quotes and brackets in ``prompt=...`` as
syntax: the command line (cli.py) says how to quote such a prompt before Hydra sees it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from qlora_lab import models
from qlora_lab.config import CONF_DIR, ChatRunConfig, register_configs
from qlora_lab.errors import ConfigError, UserError, exit_on_user_error
from qlora_lab.runs import load_run, load_trained
from qlora_lab.validate import unknown_key_problems


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` is a `qlora-lab train` run: train() writes config.yaml and metrics.json there whether it was
    called by the command line or from Python (only the command line adds .hydra/, which older runs alone have).
    One of them is enough to call it a run, so that load_run can say what an interrupted one lacks."""
    return any((folder / f).is_file() for f in ("config.yaml", "metrics.json")) or (folder / ".hydra").is_dir()


def load_chat_model(path: str):
    """(model, tokenizer) for a run directory or a merged/saved model folder."""
    folder = Path(path).expanduser()
    if is_run_dir(folder):
        return load_trained(load_run(folder))
    if (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map=models.device_map())
        return model.eval(), AutoTokenizer.from_pretrained(folder)
    raise UserError(f"run={path!r} is neither a run directory (with config.yaml and metrics.json) nor a model folder "
                    "(with config.json).")


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict], cfg: DictConfig, stream: bool = False) -> str:
    """One assistant answer to ``messages``."""
    from transformers import TextStreamer

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k} \
        if cfg.do_sample else {"do_sample": False}
    if cfg.do_sample:
        torch.manual_seed(cfg.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         streamer=streamer, **sampling)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def chat(cfg: DictConfig) -> str | list[str] | None:
    """Answer ``prompt``, the prompts of ``prompt_file``, a prompt piped into standard input, or chat interactively.
    Returns the answer, the list of answers, or None (interactive)."""
    problems = unknown_key_problems(cfg, ChatRunConfig)
    if cfg.prompt is not None and cfg.prompt_file is not None:
        problems.append("give prompt or prompt_file, not both")
    if problems:
        raise ConfigError(problems)
    history = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    if cfg.prompt_file is not None:
        prompts = read_prompt_file(cfg.prompt_file)  # before the model loads: a bad file fails at once
        model, tokenizer = load_chat_model(cfg.run)
        return answer_file(model, tokenizer, cfg, prompts, history)
    prompt = cfg.prompt
    if prompt is None and sys.stdin is not None and not sys.stdin.isatty():
        prompt = read_stdin_prompt()
    model, tokenizer = load_chat_model(cfg.run)
    if prompt is not None:
        answer = reply(model, tokenizer, [*history, {"role": "user", "content": prompt}], cfg, cfg.stream)
        if not cfg.stream:
            print(answer, flush=True)
        return answer
    print("Chatting with", cfg.run, "— empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        answer = reply(model, tokenizer, history, cfg, cfg.stream)
        if not cfg.stream:
            print(answer, flush=True)
        history.append({"role": "assistant", "content": answer})
    return None


def read_stdin_prompt() -> str:
    """The whole of standard input as one prompt (``echo ... | qlora-lab chat run=R``), without its final newline."""
    text = sys.stdin.read().strip()
    if not text:
        raise UserError("no prompt: standard input is empty. Pipe one in (echo 'your question' | qlora-lab chat "
                        "run=...), or give prompt=... or prompt_file=PATH, or run chat in a terminal to talk.")
    return text


@dataclass
class FilePrompt:
    """One prompt of a prompt_file: the messages to answer, the line as read (written back with the answer)."""

    messages: list[dict]
    record: dict
    reference: str | None = None


def read_prompt_file(path: str) -> list[FilePrompt]:
    """The prompts of ``path``: a .jsonl file of conversations, else one prompt per non-empty line."""
    if path == "-":
        text, name, jsonl = sys.stdin.read(), "standard input", None
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(f"prompt_file={path!r}: file not found (looked in {file.resolve().parent}).")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"prompt_file={path!r}: not UTF-8 text (byte {e.start}). Convert it to UTF-8.") from None
        name, jsonl = file.name, file.suffix.lower() == ".jsonl"
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if jsonl is None:  # standard input: JSONL when every line is a JSON object or list
        jsonl = bool(lines) and all(line.lstrip().startswith(("{", "[")) for _, line in lines)
    prompts = [_jsonl_prompt(name, n, line) if jsonl else
               FilePrompt([{"role": "user", "content": line.strip()}], {"prompt": line.strip()}) for n, line in lines]
    if not prompts:
        raise UserError(f"prompt_file={path!r}: no prompts in {name} (one prompt a line, or JSONL).")
    return prompts


def _jsonl_prompt(name: str, n: int, line: str) -> FilePrompt:
    where = f"prompt_file {name}:{n}"
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno}).") from None
    record = value if isinstance(value, dict) else {"messages": value}
    reference = record.get("completion")
    given = record.get("messages", record.get("prompt"))
    if isinstance(given, str):
        messages = [{"role": "user", "content": given}]
    elif isinstance(given, list) and given and all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                   for m in given):
        messages = [{"role": m["role"], "content": m["content"]} for m in given]
    else:
        raise UserError(f"{where}: expected a list of chat messages ({{\"role\": ..., \"content\": ...}}), "
                        "{\"messages\": [...]} or {\"prompt\": \"...\"}; got " + line.strip()[:80])
    if messages[-1]["role"] == "assistant":  # a conversation with its answer: the answer is the reference
        reference = messages.pop()["content"]
    if not messages or messages[-1]["role"] == "assistant":
        raise UserError(f"{where}: the conversation has no message to answer after removing its final answer.")
    if isinstance(reference, list):  # conversational completion: its assistant message
        reference = reference[-1].get("content") if reference and isinstance(reference[-1], dict) else None
    return FilePrompt(messages, record, reference if isinstance(reference, str) else None)


def answer_file(model, tokenizer, cfg: DictConfig, prompts: list[FilePrompt], system: list[dict]) -> list[str]:
    """Answer every prompt (greedy unless do_sample) and write each input line with its answer as JSONL, a line at
    a time (an interrupted batch keeps the answers so far)."""
    from tqdm.auto import tqdm

    to_stdout = cfg.answers == "-" or (cfg.answers is None and cfg.prompt_file == "-")
    out_path = None if to_stdout else Path(cfg.answers).expanduser() if cfg.answers else \
        Path(cfg.prompt_file).expanduser().with_suffix(".answers.jsonl")
    started, answers = time.time(), []
    out = sys.stdout if out_path is None else out_path.open("w", encoding="utf-8")
    try:
        for p in tqdm(prompts, desc="Answering prompts", unit="prompt", leave=False):
            messages = p.messages if p.messages[0]["role"] == "system" else [*system, *p.messages]
            answer = reply(model, tokenizer, messages, cfg)
            answers.append(answer)
            row = {**p.record, "answer": answer}
            if p.reference is not None:
                row["reference"] = p.reference
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if out_path is not None:
            out.close()
    print(f"Answered {len(answers)} prompt(s) in {time.time() - started:.1f} s"
          + (f" → {out_path}" if out_path else ""), file=sys.stderr, flush=True)
    return answers


register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="chat")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    chat(cfg)
