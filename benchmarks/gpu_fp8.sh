#!/usr/bin/env bash
# The GPU run of the precisions, fp8 included, in a few minutes on one CUDA GPU (not run by CI or `make test`):
# the `gpu` tests of amptpl and of a generated project, then `bench` in fp32, tf32, bf16, fp16 and fp8 on the
# default example's model and on a wider one, with peak memory, and the fp8 plan of the wider one. Results go to
# $OUT (default ./gpu-results): bench JSON files and the console output; put the figures, with the GPU's name,
# in docs/performance.md and docs/precision.md.
#
#   bash benchmarks/gpu_fp8.sh            # from a checkout, with the venv `make venv` builds (or any with .[dev])
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -m pip install -q --no-deps --force-reinstall . && $PY -m pip install -q "torchao>=0.18"
$PY -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -5 | tee "$OUT/amptpl-gpu-tests.txt"
PROJ=$(mktemp -d)/gpuproj
$PY -m amptpl new gpuproj --dir "$(dirname "$PROJ")" > /dev/null
cd "$PROJ"
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
$PY -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -5 | tee "$OUT/project-gpu-tests.txt"
PRECISIONS=fp32,tf32,bf16,fp16,fp8
$PY -m gpuproj.bench --precisions $PRECISIONS --steps 20 --repeats 3 --json "$OUT/bench-default.json" \
  2>&1 | tee "$OUT/bench-default.txt"
WIDE=(model.d_model=2048 model.n_layer=8 model.n_head=16 train.batch_size=16 data.seq_len=512)
$PY -m gpuproj.bench --precisions $PRECISIONS --steps 20 --repeats 3 --json "$OUT/bench-wide.json" "${WIDE[@]}" \
  2>&1 | tee "$OUT/bench-wide.txt"
$PY -m gpuproj.bench --fp8-plan "${WIDE[@]}" 2>&1 | tee "$OUT/fp8-plan-wide.txt"
