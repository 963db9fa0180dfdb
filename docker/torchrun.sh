#!/usr/bin/env bash
# Multi-GPU / multi-node DDP with torchrun (no scheduler). Run the same command on every node,
# changing only NODE_RANK:
#
#   # one node, 8 GPUs
#   NPROC_PER_NODE=8 docker/torchrun.sh fit --config configs/cifar10_vp_ddpmpp.yaml
#   # two nodes: on node 0 and on node 1 (MASTER_ADDR = node 0's address, reachable from node 1)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 docker/torchrun.sh fit --config configs/cifar10_vp_ddpmpp.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 docker/torchrun.sh fit --config configs/cifar10_vp_ddpmpp.yaml
#   # resume, evaluate
#   docker/torchrun.sh fit  --config configs/cifar10_vp_ddpmpp.yaml --ckpt_path last
#   docker/torchrun.sh test --config configs/cifar10_vp_ddpmpp.yaml --ckpt_path runs/cifar10_vp/checkpoints/last.ckpt
#
# torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
# MASTER_PORT for every process, and Lightning detects TorchElasticEnvironment from them. The
# --trainer.num_nodes/--trainer.devices flags appended below must match --nnodes/--nproc_per_node.
# Inside Docker use --gpus all --ipc=host --network=host (NCCL needs the host network between nodes).
# Python: the project's virtual environment, PYTHON=${PYTHON:-.venv/bin/python} (created by
# `make install`); inside the Docker image set PYTHON=python. `$PYTHON -m torch.distributed.run` is
# what the `torchrun` command runs.
set -euo pipefail

cd "$(dirname "$0")/.."   # the repository root
PYTHON=${PYTHON:-.venv/bin/python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATOR=${ACCELERATOR:-gpu}

if [[ $# -lt 1 ]]; then
    echo "usage: $0 {fit,validate,test,likelihood} --config configs/<name>.yaml [more cli.py flags]" >&2
    exit 2
fi
SUBCOMMAND=$1
shift

exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    cli.py "$SUBCOMMAND" "$@" \
    --trainer.accelerator "$ACCELERATOR" \
    --trainer.num_nodes "$NNODES" \
    --trainer.devices "$NPROC_PER_NODE" \
    --trainer.strategy ddp
