#!/usr/bin/env bash
# Validate Birder's GPU path on ONE GPU in at most ~8 minutes; results under the directory given.
#   bash benchmarks/gpu_check.sh OUT_DIR
# 1. versions; 2. tests/kernels with real Triton compilation (no interpreter); 3. kernel GB/s vs a
# same-size copy (bench_kernels.py, 64M elements); 4. benchmarks/gpu_check.py: each kernel at 2**24+3
# elements vs the reference, the hook at world size 1 on NCCL (50M parameters, streams, host syncs,
# step 1 vs 10, DDP fp32 beside it), 2 processes sharing the GPU over gloo for every collective.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
unset TRITON_INTERPRET
status=0
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/versions.txt" 2>&1
cat "$out/versions.txt"
timeout 240 python -m pytest -q -x tests/kernels -p no:cacheprovider > "$out/tests_kernels.txt" 2>&1 || status=1
tail -3 "$out/tests_kernels.txt"
timeout 120 python benchmarks/bench_kernels.py --sizes 64M --out "$out/bench_kernels.md" > "$out/bench_kernels.txt" 2>&1 || status=1
tail -20 "$out/bench_kernels.txt"
timeout 200 python benchmarks/gpu_check.py "$out" > "$out/gpu_check.txt" 2>&1 || status=1
cat "$out/gpu_check.txt" | cut -c1-600
echo "NOTE: NCCL refuses two ranks on one GPU: multi-rank NCCL is not checked by this script."
exit $status
