"""qlora_lab: parameter-efficient fine-tuning with Hydra configs, bitsandbytes, peft and TRL."""

import logging

__version__ = "0.1.0"

# bitsandbytes (CPU, AVX512-BF16) tries to fetch an optional kernel from the Hugging Face hub through the `kernels`
# package at import and warns when it cannot; its built-in CPU kernels are used instead, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
