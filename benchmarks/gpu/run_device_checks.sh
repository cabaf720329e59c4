#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README "GPU checks"): install the carried wheels, run the GPU-gated
# and integration tests on CUDA, and compare the loss paths. Results go to $OUT.
# Carry: .whl (../shared/device/fetch-wheels.sh + pytest wheels) and .gpu_cache (a copy of the tiny-random cache).
set -u
OUT=${OUT:-/tmp/qlora_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/install.txt" 2>&1
export PYTHONPATH=/tmp/site:$PWD QLORA_LAB_CACHE=$PWD/.gpu_cache TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch,transformers,peft,trl,bitsandbytes as b;print(torch.__version__,transformers.__version__,peft.__version__,trl.__version__,b.__version__)"
} > "$OUT/gpu.txt" 2>&1
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -m "gpu or integration" \
  tests/test_adapters.py tests/test_train.py tests/test_merge.py > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest exit $?" >> "$OUT/pytest_gpu.txt"
timeout ${BENCH_TIMEOUT:-150} python3 benchmarks/gpu/loss_paths.py --out "$OUT/loss_paths.json" > "$OUT/loss_paths.log" 2>&1
echo "bench exit $?" >> "$OUT/loss_paths.log"
tail -5 "$OUT/pytest_gpu.txt"; cat "$OUT/gpu.txt"; cat "$OUT/loss_paths.json" 2>/dev/null | head -40
