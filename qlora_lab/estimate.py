"""Will it fit?": the memory a training run needs, from the model's config alone (no weights loaded).

    weights      quantized linear layers (4-bit: 0.5 byte/param + block constants) + the rest in the model dtype
    trainable    adapter (or all) parameters + their gradients + AdamW's two states
    activations  what the backward pass keeps per token and layer (or only each layer's input with activation
                 checkpointing, plus one layer recomputed at a time)
    logits       batch x seq x vocab, in bf16 and again in float32 for the loss (and its gradient) — for the
                 tokens the loss implementation computes logits for

The activation constants count the tensors a Llama-style decoder layer saves for backward (q/k/v/o, the MLP's
gate/up/act/product, two RMSNorm inputs kept in float32, LoRA-dropout copies of the adapted inputs); they are an
approximation, which is why `qlora-lab bench` records the estimate beside the measured peak (and the ratio).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

GiB = 2**30

# bytes per parameter of a 4-bit weight: 4 bits + an fp32 absmax per 64-block, or with double quantization an
# 8-bit absmax per block + an fp32 constant per 256 blocks (the QLoRA paper's 0.127 bit/param)
NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}


def count_params(model_config) -> dict[str, int]:
    """Parameter counts by kind, from an empty (meta-device) model: no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not head)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    shapes = [(m.in_features, m.out_features) for m in model.modules()
              if isinstance(m, torch.nn.Linear) and m is not head]
    by_name: dict[str, int] = {}  # leaf module name (q_proj, down_proj, ...) -> its parameters over all layers
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            leaf = name.rsplit(".", 1)[-1]
            by_name[leaf] = by_name.get(leaf, 0) + m.weight.numel()
    return {"total": total, "linear": linear, "other": total - linear, "linear_shapes": shapes,
            "linear_by_name": by_name}


def estimate(model_config, *, quant: str = "nf4", double_quant: bool = True, adapter: str = "lora", r: int = 16,
             dropout: float = 0.05, dropout_impl: str = "torch", kernels: str = "none", batch: int = 8,
             seq_len: int = 512, checkpointing: bool | float = False, loss: str = "native", loss_tokens: float = 1.0,
             model_bytes: int = 2, counts: dict[str, Any] | None = None,
             skip_modules: tuple[str, ...] | list[str] = (), offload: bool = False) -> dict[str, Any]:
    """Bytes a training step needs on the device, by part; ``loss_tokens`` is the share of tokens with a label
    (what ``loss=selective`` computes logits for); ``counts`` = count_params(model_config), when known;
    ``skip_modules``: linear layers left unquantized (the resolved quant.skip_modules); ``offload``: the saved
    activations are offloaded to host memory (TRL's activation offloading, offload_activations)."""
    n = counts or count_params(model_config)
    unquantized = sum(v for k, v in n.get("linear_by_name", {}).items() if k in skip_modules)
    c = model_config
    h, i = c.hidden_size, c.intermediate_size
    layers, vocab = c.num_hidden_layers, c.vocab_size
    kv = (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * (
        getattr(c, "head_dim", None) or h // c.num_attention_heads)

    if quant in ("nf4", "fp4"):
        weights = (n["linear"] - unquantized) * NF4_BYTES[double_quant] + (n["other"] + unquantized) * model_bytes
    elif quant == "int8":
        weights = (n["linear"] - unquantized) * 1.0 + (n["other"] + unquantized) * model_bytes
    else:
        weights = n["total"] * model_bytes

    if adapter == "full":
        trainable_params = n["total"]
        per_param = model_bytes * 3  # gradient, AdamW exp_avg and exp_avg_sq in the model dtype (the weight: above)
    elif adapter == "lora":
        trainable_params = sum(r * (fan_in + fan_out) for fan_in, fan_out in n["linear_shapes"])
        # TRL keeps adapters on a 4-bit base in bf16; on a bf16 base peft keeps them in float32
        per_param = 4 * (2 if quant != "none" else 4)
    else:  # prefix / prompt / ia3: a few thousand to a million parameters
        trainable_params = layers * 2 * kv * 16 if adapter == "prefix" else h * 16
        per_param = 16
    trainable = trainable_params * per_param

    tokens = batch * seq_len
    layer_elems = 8 * h + 3 * kv + 4 * i                 # saved bf16 tensors of one decoder layer, per token
    layer_bytes = 2 * layer_elems + 4 * 2 * h            # + two RMSNorm inputs kept in float32
    if kernels in ("lean", "liger"):
        layer_bytes -= 2 * 2 * h + 2 * i                 # norm inputs kept in bf16, not float32; SiLU recomputed
    if adapter == "lora" and dropout > 0:
        # per adapted input: the dropped copy (bf16; recompute: not kept) + the mask (FastDropout: 1 byte; torch's
        # dropout: the input's dtype on CPU, 1 byte on CUDA — counted as the larger)
        layer_bytes += {"recompute": 1, "fast": 3}.get(dropout_impl, 4) * (6 * h + i)
    # checkpointing: True (every layer), False, or the fraction of layers checkpointed (every n-th: 1/n)
    share = float(checkpointing)
    kept = layers - round(layers * share)                  # layers that keep all their activations
    # + one checkpointed layer recomputed at a time; with some layers kept, the later ones are freed by then
    activations = tokens * (kept * layer_bytes + (layers - kept) * 2 * h + (layer_bytes if kept == 0 else 0))
    if offload:
        # TRL's OffloadActivations moves every saved tensor of >= 1 KiB but the LM head's to host memory: on the device
        # stay the layer being recomputed (or run) and the checkpointed inputs in flight (its forward stash of 5
        # tensors, the backward's prefetch); counted as one layer's activations + two layer inputs
        activations = tokens * (layer_bytes + 2 * 2 * h)
    if adapter == "full" or quant == "none":
        activations += tokens * h * 2                   # the embedding output also needs a gradient path
    logit_tokens = tokens * (loss_tokens if loss == "selective" else 1.0)
    logits = logit_tokens * vocab * (2 + 4 + 4)          # bf16 logits, float32 copy, float32 gradient
    if loss == "fused":
        logits += logit_tokens * vocab * 4               # TRL's entropy / accuracy metrics over the vocabulary
    total = weights + trainable + activations + logits
    return {"weights_bytes": int(weights), "trainable_bytes": int(trainable), "activations_bytes": int(activations),
            "logits_bytes": int(logits), "total_bytes": int(total), "trainable_params": int(trainable_params),
            "params": int(n["total"])}


def shape_or_none(tokenizer, rows, max_length: int | None) -> tuple[int, float] | None:
    """:func:`data_shape`, or None where the rows cannot be sampled (a streamed dataset has no length and no
    slicing): an estimate never stops a run."""
    if not hasattr(rows, "__len__"):
        return None
    try:
        return data_shape(tokenizer, rows, max_length)
    except Exception as e:  # noqa: BLE001
        log.debug("no data shape for the memory estimate: %s", e)
        return None


def data_shape(tokenizer, rows, max_length: int | None, sample: int = 256) -> tuple[int, float]:
    """(padded length of a batch — the longest row, capped at max_length — and the labelled share of tokens).

    From the prepared rows' ``length`` / ``trained`` columns (qlora_lab/prepare.py) when they have them, else
    tokenized here from up to ``sample`` rows in TRL's formats."""
    names = getattr(rows, "column_names", None) or ()
    if "length" in names and "trained" in names and hasattr(rows, "__len__"):
        from qlora_lab.data import column

        if len(rows) == 0:
            return max_length or 1024, 1.0
        lengths, trained = column(rows, "length"), column(rows, "trained")
        longest = int(lengths.max())
        return (min(longest, max_length) if max_length else longest), float((trained / lengths).mean())
    lengths, shares = [], []
    for row in rows.select(range(min(sample, len(rows)))) if hasattr(rows, "select") else rows[:sample]:
        if "text" in row and row["text"] is not None:
            n = len(tokenizer(row["text"])["input_ids"])
            lengths.append(n)
            shares.append(1.0)
            continue
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):
            n_prompt = len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                              return_dict=False))
            n = len(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=False))
        else:
            n_prompt = len(tokenizer(prompt)["input_ids"])
            n = n_prompt + len(tokenizer(completion)["input_ids"])
        lengths.append(n)
        shares.append(max(n - n_prompt, 1) / max(n, 1))
    if not lengths:
        return max_length or 1024, 1.0
    longest = max(lengths)
    return min(longest, max_length) if max_length else longest, sum(shares) / len(shares)
