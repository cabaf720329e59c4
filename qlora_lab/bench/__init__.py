"""`qlora-lab bench`: tokens/s, step time, peak memory, MFU and the memory estimate, for qlora_lab's default recipe
side by side with the plain TRL recipe, every configuration in a fresh process.

- app.py: the Hydra app — runs the matrix, writes <results_dir>/<name>.{json,md,png}
- worker.py: one configuration in one process (`python -m qlora_lab.bench.worker SPEC OUT`)
- plain_recipe.py: the hand-written TRL + peft + bitsandbytes script it is compared with
- rows.py: the benchmark's training rows
"""
