"""CPU-only levers, together: the lean decoder kernels (kernels.py), LoRA dropout with fewer random draws and its
recomputation (dropout.py), and the C allocator the CLI re-executes itself with (allocator.py).

Each is chosen by the run's plan (qlora_lab/plan.py): on by default on CPU, for the model families it is tested on,
and the plan says so when it is off.
"""
