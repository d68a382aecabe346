#!/usr/bin/env bash
# Several machines: run this same command on every node (torchrun's c10d rendezvous).
#
#   NNODES=2 RDZV_ENDPOINT=node0:29500 RUN_ID=exp42 launch/multi_node.sh compression.collective=hierarchical
#   NNODES=2 RDZV_ENDPOINT=node0:29500 RUN_ID=exp43 launch/multi_node.sh trainer.parallelism=hsdp
#       (FSDP2 shards the model over each node's processes; Birder sends 1 bit per element across nodes)
#
#   NNODES          number of nodes (or MIN:MAX for elastic)
#   NPROC_PER_NODE  processes per node (default: GPUs on this node, else 2)
#   RDZV_ENDPOINT   host:port of the rendezvous, reachable from every node (any node's address)
#   RUN_ID          the job's name: the same on every node; also names the output directory
#   OUTPUT_ROOT     where outputs/<RUN_ID> goes (default: outputs); must be shared between nodes
#   MAX_RESTARTS    torchrun restarts on failure, each resuming from the last checkpoint (default 3)
set -euo pipefail

: "${NNODES:?set NNODES}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}" "${RUN_ID:?set RUN_ID}"
if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count())')}
else
    NPROC_PER_NODE=${NPROC_PER_NODE:-2}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
# A fresh store per restart: torchrun's shared store keeps the previous attempt's
# addresses (pytorch/pytorch#135712), and restart counts differ between nodes.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# Pre-flight on every node (its own data, devices and paths): a config or input mistake is one line and
# exit status 2 before torchrun, not a traceback and --max-restarts retries. PREFLIGHT=0 skips it.
if [ "${PREFLIGHT:-1}" != 0 ]; then
    NODES_MAX=${NNODES##*:}
    WORLD_SIZE=$((NODES_MAX * NPROC_PER_NODE)) LOCAL_WORLD_SIZE="$NPROC_PER_NODE" \
        python -m dist_supernet.train --check hydra.run.dir="${OUTPUT_ROOT:-outputs}/$RUN_ID" "$@" || exit $?
fi

# hydra.run.dir from RUN_ID: every node and every restart agree on one directory.
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RUN_ID" \
    --max-restarts="${MAX_RESTARTS:-3}" \
    -m dist_supernet.train hydra.run.dir="${OUTPUT_ROOT:-outputs}/$RUN_ID" "$@"
