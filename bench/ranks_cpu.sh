#!/usr/bin/env bash
# 2 ranks x 1 thread (torchrun, gloo) against 1 process x 2 threads on the sycophancy recipe, CPU:
# the same global batch (8), so the same schedule; compares throughput, peak memory per rank and the
# held-out results. Run on a quiet machine (nothing else using the cores). ~20 min on 2 cores.
#   bash bench/ranks_cpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/preftune-ranks}
rm -rf "$out"; mkdir -p "$out"
py=.venv/bin/python
cfg=examples/sycophancy.yaml
# the reference log-probs are cached by the first run and reused by the second: train_seconds compares the loops
/usr/bin/time -v $py -m preftune train $cfg output_dir="$out/one" per_device_train_batch_size=8 progress=false \
    2> >(tee "$out/one.err" >&2)
OMP_NUM_THREADS=1 /usr/bin/time -v $py -m torch.distributed.run --standalone --nproc_per_node 2 \
    -m preftune train $cfg output_dir="$out/two" per_device_train_batch_size=4 progress=false \
    2> >(tee "$out/two.err" >&2)
$py bench/compare_runs.py "$out/one" "$out/two" | tee "$out/comparison.md"
