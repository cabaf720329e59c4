# Sourced by run_session.sh and run_targets.sh (not run alone): install the carried wheels (.whl, unless
# SKIP_INSTALL=1), set the offline environment, record the GPU and the stack's versions in $OUT/setup.txt, then run
# the GPU-gated tests into $OUT/pytest_gpu.txt (unless SKIP_TESTS=1; TEST_TIMEOUT seconds, default 120).
# Defines stamp: `stamp "what"` appends "[seconds since start] what" to $OUT/setup.txt.
set -u
OUT=${OUT:-/tmp/qlora_out}; mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" >> "$OUT/setup.txt"; }
if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$OUT/setup.txt" 2>&1
  export PYTHONPATH=/tmp/site:$PWD
fi
export QLORA_LAB_CACHE=${QLORA_LAB_CACHE:-$PWD/.gpu_cache} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch,transformers,peft,trl,bitsandbytes as b;print(torch.__version__,transformers.__version__,peft.__version__,trl.__version__,b.__version__)"
  python3 -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))"
} >> "$OUT/setup.txt" 2>&1
stamp "installed"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/ > "$OUT/pytest_gpu.txt" 2>&1
  echo "pytest exit $?" >> "$OUT/pytest_gpu.txt"
  stamp "gpu tests done"
fi
