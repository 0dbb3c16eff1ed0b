#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<host of node 0> MASTER_PORT=29500 NPROC=8 \
#     bash launch/multi_node.sh my.yaml [dotted overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${CLIPKIT_NO_ENV:-}" ] || . launch/env.sh
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC=${NPROC:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-clipkit}" \
    -m clipkit train "$@"
