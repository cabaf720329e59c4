#!/usr/bin/env bash
# A lent GPU session's whole check in one command (~8 minutes on an H200): install the carried wheels, run the
# GPU-gated tests, then the issue-#6 GPU matrix: Llama-3.1-8B-architecture QLoRA at seq 2048 — qlora_lab's default,
# the plain recipe, and two levers (lean kernels + recomputed dropout; every layer checkpointed). Everything lands
# in $OUT in at most 8 files (the device tool returns no more); the bench writes its JSON/Markdown after every
# configuration, so a run cut short keeps what it measured. Qwen2.5-7B-arch: MODEL=qwen2.5-7b-arch.
# Carry: .whl (../shared/device/fetch-wheels.sh liger-kernel==0.8.5) and .gpu_cache (a copy of the tiny-random
# cache folder). Every configuration also profiles 2 steps after the measured ones (where the GPU time goes: MFU,
# Liger's slow steps). Knobs: MODEL SEQ BATCH STEPS WARMUP PROFILE TEST_TIMEOUT BENCH_TIMEOUT; SKIP_INSTALL=1 where the stack is there.
. benchmarks/gpu/setup.sh  # install, environment, versions, GPU-gated tests
# the variants: this script's arguments (Hydra overrides) or, by default, the levers not yet measured on a GPU (the
# CPU defaults lean kernels + recomputed dropout) and every layer checkpointed
[ $# -gt 0 ] || set -- '+bench.variants.lean=["kernels=lean","adapter.dropout_impl=recompute"]' \
  '+bench.variants.ckpt_all=["trainer.gradient_checkpointing=true"]'

work=/tmp/qlora_bench_work
timeout "${BENCH_TIMEOUT:-390}" python3 -m qlora_lab bench "model=${MODEL:-llama-3.1-8b-arch}" "bench.methods=[qlora]" \
  "bench.seq_lens=[${SEQ:-2048}]" "bench.batch_sizes=[${BATCH:-4}]" "bench.steps=${STEPS:-4}" \
  "bench.warmup_steps=${WARMUP:-2}" "bench.profile_steps=${PROFILE:-2}" bench.timeout_s=170 "bench.results_dir=$OUT" "hydra.run.dir=$work" "$@" \
  > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/bench.log"
stamp "bench done"
(cd "$work" 2>/dev/null && tar czf "$OUT/worker-logs.tgz" -- *.log *.json .hydra 2>/dev/null)
tail -4 "$OUT/pytest_gpu.txt"; cat "$OUT/setup.txt" | grep -v "^ *$" | tail -8; tail -12 "$OUT/bench.log"
