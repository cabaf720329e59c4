#!/usr/bin/env bash
# Issue #20 on a lent GPU: install the carried wheels, run the GPU-gated tests, then the targets' phases, each
# capped by its own timeout, then benchmarks/gpu/targets.py composes gpu-targets-<card>-<date>.{json,md} (a phase
# that did not run is "not measured" there). The device tool allows 10 minutes per command and a session 15 minutes
# of device time, machine start included: the default PHASES (budget24 maxseq24, ~9 minutes at most by the
# timeouts) are the headline targets; the other two take a second call or session:
#   PHASES="mfu4096 maxseq12" SKIP_TESTS=1 bash benchmarks/gpu/run_targets.sh
#   budget24  seq 2048, batch 4, both recipes capped at 24 GiB (+ variants: offloading, compiled layers)
#   maxseq24  longest sequence at batch 1 inside 24 GiB (from 16k doubling to 128k or halving, bisecting to 4k)
#   mfu4096   seq 4096, batch 2, no budget (qlora_lab, compiled layers, padding-free batches)
#   maxseq12  longest sequence at batch 1 inside 12 GiB (from 4k, bisecting to 2k)
# $OUT gets at most 8 files (the device tool returns no more): setup.txt, pytest_gpu.txt, targets.log,
# gpu-targets-*.{json,md} and phases.tgz (every phase's JSON/Markdown/PNG/log, re-packed after each phase, so a
# run cut short keeps what it measured). PHASES picks and orders them (default: budget24 maxseq24); SKIP_TESTS=1 skips the tests; SKIP_INSTALL=1
# where the stack is installed. Carry: .whl (../shared/device/fetch-wheels.sh) and .gpu_cache (the tiny-random cache).
#   bash benchmarks/gpu/run_targets.sh            # then copy $OUT/gpu-targets-* into benchmarks/results/
TEST_TIMEOUT=${TEST_TIMEOUT:-90}
. benchmarks/gpu/setup.sh  # install, environment, versions, GPU-gated tests
model="model=${MODEL:-llama-3.1-8b-arch}"
res=/tmp/qlora_results; mkdir -p "$res"
common=("$model" "bench.methods=[qlora]" "bench.results_dir=$res" bench.timeout_s=170)
variants='+bench.variants={offload:["offload_activations=true"],compiled:["compile=layers"]}'
phase() {  # name timeout args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m qlora_lab bench "${common[@]}" "bench.name=$name" "hydra.run.dir=/tmp/qlora_work/$name" "$@" \
    > "$res/$name.log" 2>&1
  echo "$name exit $?" >> "$res/$name.log"; stamp "$name done"
  # the results and every worker's log (failed probes' tracebacks), not the rows
  tar czf "$OUT/phases.tgz" --exclude='*.jsonl' -C /tmp qlora_results qlora_work 2>/dev/null
}
for p in ${PHASES:-budget24 maxseq24}; do
  case $p in
    budget24) phase budget24 240 "bench.seq_lens=[2048]" "bench.batch_sizes=[4]" bench.memory_budget_gb=24 \
                bench.steps=4 bench.warmup_steps=2 "$variants" ;;
    maxseq24) phase maxseq24 200 bench.max_seq=true "bench.batch_sizes=[1]" bench.memory_budget_gb=24 \
                "bench.seq_lens=[16384]" bench.max_seq_limit=131072 bench.max_seq_step=4096 ;;
    mfu4096)  phase mfu4096 300 "bench.seq_lens=[4096]" "bench.batch_sizes=[2]" "bench.recipes=[qlora_lab]" \
                bench.steps=4 bench.warmup_steps=2 \
                '+bench.variants={compiled:["compile=layers"],padding_free:["batching=padding_free"]}' ;;
    maxseq12) phase maxseq12 200 bench.max_seq=true "bench.batch_sizes=[1]" bench.memory_budget_gb=12 \
                "bench.seq_lens=[4096]" bench.max_seq_limit=65536 bench.max_seq_step=2048 ;;
    *) echo "unknown phase '$p' (budget24 maxseq24 mfu4096 maxseq12)" | tee -a "$OUT/setup.txt" ;;
  esac
done
python3 benchmarks/gpu/targets.py --runs "$res" --out "$OUT" > "$OUT/targets.log" 2>&1
tail -4 "$OUT/pytest_gpu.txt" 2>/dev/null; grep -v "^ *$" "$OUT/setup.txt" | tail -8; cat "$OUT/targets.log"
