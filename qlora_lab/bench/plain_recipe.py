"""The plain recipe: what a user writes from the TRL / peft / bitsandbytes docs, with their defaults.

qlora_lab's default recipe is measured against this script in the same `qlora-lab bench` run, on the same model,
rows, adapter settings and batch. Nothing here is tuned: SFTConfig's defaults stay (gradient checkpointing on,
TRL's own loss path, padding to the longest row of each batch). Two settings are not defaults because the
comparison needs them: `include_num_input_tokens_seen="non_padding"` (to count the tokens trained on; both
recipes count them the same way) and `use_cpu` on a machine without a GPU (transformers refuses bf16 there
otherwise). Runnable on its own:

    python -m qlora_lab.bench.plain_recipe MODEL_DIR ROWS.jsonl --method qlora --batch 8 --seq-len 256 --steps 8
"""

from __future__ import annotations

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig, PrefixTuningConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer


def build(model_path: str, rows_path: str, method: str, batch: int, seq_len: int, steps: int, output_dir: str,
          callbacks=()) -> SFTTrainer:
    quantization = None
    if method == "qlora":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, quantization_config=quantization,
                                                 device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"})
    if method in ("qlora", "lora"):
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    elif method == "prefix":
        peft_config = PrefixTuningConfig(num_virtual_tokens=16, task_type="CAUSAL_LM")
    else:  # full fine-tuning
        peft_config = None

    # chat rows -> prompt/completion, so that the loss is on the answer (TRL's completion-only default)
    dataset = load_dataset("json", data_files=rows_path, split="train")
    dataset = dataset.map(lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
                          remove_columns=["messages"])

    args = SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        max_length=seq_len,
        max_steps=steps,
        learning_rate=2e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
    )
    return SFTTrainer(model=model, args=args, train_dataset=dataset, peft_config=peft_config,
                      callbacks=list(callbacks))


def build_preference(model_path: str, pairs_path: str, objective: str, batch: int, seq_len: int, steps: int,
                     output_dir: str, callbacks=()):
    """The plain preference recipe: TRL's DPO / ORPO / KTO trainer from its docs' QLoRA example, defaults kept (the
    reference model: TRL's own choice with a peft_config, the base with the adapter disabled; ORPO has none)."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.data_utils import unpair_preference_dataset

    if objective == "orpo":
        import warnings

        with warnings.catch_warnings():  # trl.experimental warns on import that its API may change
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, quantization_config=quantization,
                                                 device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"})
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    dataset = load_dataset("json", data_files=pairs_path, split="train")
    trainer_cls, config_cls = {"dpo": (DPOTrainer, DPOConfig), "kto": (KTOTrainer, KTOConfig)}.get(
        objective, (ORPOTrainer, ORPOConfig) if objective == "orpo" else (None, None))
    if trainer_cls is None:
        raise ValueError(f"objective={objective!r}: use dpo, orpo or kto")
    if objective == "kto":
        dataset = unpair_preference_dataset(dataset)  # TRL's own pairs -> prompt/completion/label
    args = config_cls(output_dir=output_dir, per_device_train_batch_size=batch, max_length=seq_len, max_steps=steps,
                      learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to="none",
                      include_num_input_tokens_seen="non_padding", use_cpu=not torch.cuda.is_available())
    return trainer_cls(model=model, args=args, train_dataset=dataset, peft_config=peft_config,
                       callbacks=list(callbacks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_path")
    parser.add_argument("rows")
    parser.add_argument("--method", default="qlora", choices=["qlora", "lora", "full", "prefix"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--output-dir", default="plain-recipe-out")
    a = parser.parse_args()
    build(a.model_path, a.rows, a.method, a.batch, a.seq_len, a.steps, a.output_dir).train()


if __name__ == "__main__":
    main()
