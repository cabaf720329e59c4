#!/usr/bin/env bash
# `qlora-lab bench` on a lent GPU machine: install the carried wheels, then run the GPU matrix (architecture-only
# model, qlora_lab vs the plain recipe, fresh process per configuration). Results go to $OUT.
# Carry: .whl (../shared/device/fetch-wheels.sh) and .gpu_cache (a copy of the tiny-random cache folder).
#   MODEL=llama-3.1-8b-arch SEQ=2048 BATCH=4 METHODS=[qlora] bash benchmarks/gpu/run_bench.sh
set -u
OUT=${OUT:-/tmp/qlora_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/install.txt" 2>&1
export PYTHONPATH=/tmp/site:$PWD QLORA_LAB_CACHE=$PWD/.gpu_cache TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
timeout ${BENCH_TIMEOUT:-400} python3 -m qlora_lab bench model=${MODEL:-llama-3.2-1b-arch} \
  "bench.methods=${METHODS:-[qlora]}" "bench.seq_lens=[${SEQ:-2048}]" "bench.batch_sizes=[${BATCH:-4}]" \
  bench.steps=${STEPS:-4} bench.warmup_steps=1 "bench.results_dir=$OUT" "hydra.run.dir=$OUT/work" \
  > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/bench.log"
rm -f "$OUT"/work/rows-*.jsonl
tail -25 "$OUT/bench.log"; cat "$OUT/gpu.txt"
