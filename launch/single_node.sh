#!/usr/bin/env bash
# One machine, one process per GPU (or NPROC CPU processes): a thin wrapper around torchrun.
#
#   launch/single_node.sh compression=fp16 trainer.max_steps=500
#   NPROC=4 MAX_RESTARTS=2 launch/single_node.sh
#
# Exit status: 0 done, 2 a config/input mistake (one line, before torchrun), non-zero otherwise
# (SIGTERM: every rank checkpoints first; rerunning with the same hydra.run.dir resumes).
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

# Pre-flight: every check that needs no process group, once, before torchrun starts. A config or input
# mistake is one line and exit status 2 here; under torchrun it would be status 1, torchrun's traceback,
# and a retry per --max-restarts. PREFLIGHT=0 skips it (saves the few seconds it takes).
if [ "${PREFLIGHT:-1}" != 0 ]; then
    WORLD_SIZE="$NPROC" LOCAL_WORLD_SIZE="$NPROC" python -m dist_supernet.train --check "$@" || exit $?
fi

# exec: SIGTERM (preemption) reaches torchrun, which forwards it to the workers; they checkpoint and exit 143.
exec torchrun --standalone --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" \
    -m dist_supernet.train "$@"
