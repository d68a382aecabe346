#!/usr/bin/env bash
# One machine, one process per GPU (or NPROC CPU processes): a thin wrapper around torchrun.
#
#   launch/single_node.sh compression=fp16 trainer.max_steps=500
#   NPROC=4 MAX_RESTARTS=2 launch/single_node.sh
#
# Everything after the script name is a Hydra override for dist_supernet.train.
set -euo pipefail

if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    NPROC=${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count())')}
else
    NPROC=${NPROC:-2}
    # gloo picks the interface of the hostname by default, which may not reach itself in a container.
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

exec torchrun --standalone --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" \
    -m dist_supernet.train "$@"
