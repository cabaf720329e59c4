"""`qlora-lab chat`: talk to a run (its adapter on the base, in the training quantization) or a merged folder.

The model's chat template is applied; tokens stream as they are generated; decoding is greedy unless
``do_sample=true``.
"""

from __future__ import annotations

import sys
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
    sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k) \
        if cfg.do_sample else dict(do_sample=False)
    if cfg.do_sample:
        torch.manual_seed(cfg.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         streamer=streamer, **sampling)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def chat(cfg: DictConfig) -> str | None:
    problems = unknown_key_problems(cfg, ChatRunConfig)
    if problems:
        raise ConfigError(problems)
    model, tokenizer = load_chat_model(cfg.run)
    history = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    if cfg.prompt is not None:
        answer = reply(model, tokenizer, [*history, {"role": "user", "content": cfg.prompt}], cfg, cfg.stream)
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


register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="chat")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    chat(cfg)
