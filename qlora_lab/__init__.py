"""qlora_lab: parameter-efficient fine-tuning with Hydra configs, bitsandbytes, peft and TRL."""

__version__ = "0.1.0"
