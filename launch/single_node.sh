#!/usr/bin/env bash
# One node, N processes (GPUs; on CPU, gloo processes). Usage:
#   NPROC=8 bash launch/single_node.sh my.yaml train.global_batch_size=4096 [dotted overrides...]
# Backend: nccl when CUDA is available, gloo otherwise (chosen by clipkit).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${CLIPKIT_NO_ENV:-}" ] || . launch/env.sh
NPROC=${NPROC:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
exec torchrun --standalone --nproc_per_node="$NPROC" -m clipkit train "$@"
