#!/bin/bash
# Multi-node, multi-GPU training on SLURM (DDP, one task per GPU), with pre-emption and requeue.
#
#   sbatch docker/slurm_train.sh                                    # fit, CONFIG below
#   CONFIG=configs/cifar10_ve_ncsnpp.yaml sbatch --nodes=4 docker/slurm_train.sh
#   CONFIG="configs/cifar10_vp_ddpmpp.yaml configs/cifar10_vp_ddpmpp_deep.yaml" sbatch docker/slurm_train.sh
#                                   # several files, composed in order (later ones override)
#   SUBCOMMAND=test EXTRA="--ckpt_path runs/cifar10_vp/checkpoints/last.ckpt" sbatch docker/slurm_train.sh
#
# Lightning detects SLURM by itself (SLURMEnvironment; SLURM_NTASKS is set and the job name is not
# "bash" or "interactive"). The environment takes ranks, MASTER_ADDR (the first node) and MASTER_PORT
# (derived from the job id; override with MASTER_PORT) from SLURM. It checks that
# --trainer.devices equals --ntasks-per-node and --trainer.num_nodes equals the node count.
# Processes must be started with srun: without srun they hang, and Lightning warns when srun is
# available but unused.
#
# Pre-emption: SLURMEnvironment(auto_requeue=True) is the default. `--signal=SIGUSR1@90` makes
# SLURM send SIGUSR1 to every task 90 s before the time limit. Lightning then writes
# <default_root_dir>/hpc_ckpt_<n>.ckpt and calls `scontrol requeue $SLURM_JOB_ID` (this needs
# --requeue). When the job starts again, Lightning resumes by itself from the newest hpc_ckpt_* if
# no ckpt_path is given. This script picks the newer of that file and checkpoints/last.ckpt, so
# that a job restarted after a node failure (no hpc checkpoint written) also resumes; for last.ckpt
# it passes `--ckpt_path last`, which falls back to the newest readable checkpoint if last.ckpt is
# cut off. A run stopped by SIGTERM (pre-emption, scancel) exits 143 after writing last.ckpt; the
# script then requeues the job itself (`scontrol requeue`), so it continues where it stopped.
# To set the plugin explicitly, e.g. to turn requeueing off:
#   --trainer.plugins=lightning.fabric.plugins.environments.SLURMEnvironment --trainer.plugins.auto_requeue=false
#
# Python: the project's virtual environment by default (PYTHON=.venv/bin/python, created by
# `make install`; run from the repository root). Inside a container image set PYTHON=python and
# prefix it with your site's runtime, e.g. (pyxis/enroot)
#   srun --container-image=hosm-lightning.sqsh --container-mounts=$PWD:/workspace/hosm-lightning python cli.py ...
# or (Apptainer) srun apptainer exec --nv hosm-lightning.sif python cli.py ...
#
#SBATCH --job-name=hosm-lightning
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4          # = GPUs per node = --trainer.devices
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8            # data loader workers + main process
#SBATCH --mem=0                      # all memory of the node
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90          # Lightning's requeue signal, 90 s before the limit
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued job appends to the same log
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"   # the repository root (submit from there)

PYTHON=${PYTHON:-.venv/bin/python}
SUBCOMMAND=${SUBCOMMAND:-fit}
CONFIG=${CONFIG:-configs/cifar10_vp_ddpmpp.yaml}   # one file or several, separated by spaces
read -r -a CONFIGS <<< "$CONFIG"
CONFIG_ARGS=()
for c in "${CONFIGS[@]}"; do CONFIG_ARGS+=(--config "$c"); done
# trainer.default_root_dir (the run folder: checkpoints/, hpc_ckpt_*, TensorBoard): the last config that
# sets it, unless ROOT_DIR is set
ROOT_DIR=${ROOT_DIR:-$("$PYTHON" -c "
import sys, yaml
root = '.'
for path in sys.argv[1:]:
    root = ((yaml.safe_load(open(path)) or {}).get('trainer') or {}).get('default_root_dir') or root
print(root)" "${CONFIGS[@]}")}
GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-4}
NNODES=${SLURM_NNODES:-1}
EXTRA=${EXTRA:-}

export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}
# export NCCL_DEBUG=WARN                # NCCL diagnostics
# export NCCL_SOCKET_IFNAME=ib0         # if the default network interface is wrong
# export TORCH_HOME=/shared/torch       # FID Inception weights: $TORCH_HOME/hub/checkpoints/

RESUME=()
if [[ "$SUBCOMMAND" == "fit" && "$EXTRA" != *"--ckpt_path"* ]]; then
    # newest of Lightning's pre-emption checkpoint and ModelCheckpoint's last.ckpt
    NEWEST=$(ls -t "$ROOT_DIR"/hpc_ckpt_*.ckpt "$ROOT_DIR"/checkpoints/last.ckpt 2>/dev/null | head -n 1 || true)
    if [[ "$NEWEST" == */checkpoints/last.ckpt ]]; then
        RESUME=(--ckpt_path last)   # last.ckpt, or the newest readable checkpoint if it is cut off
        echo "resuming from $NEWEST (restart count ${SLURM_RESTART_COUNT:-0})"
    elif [[ -n "$NEWEST" ]]; then
        RESUME=(--ckpt_path "$NEWEST")
        echo "resuming from $NEWEST (restart count ${SLURM_RESTART_COUNT:-0})"
    fi
fi

echo "job $SLURM_JOB_ID: $NNODES node(s) x $GPUS_PER_NODE GPU(s), $SUBCOMMAND ${CONFIG_ARGS[*]}"
STATUS=0
# shellcheck disable=SC2086  # EXTRA is a list of flags
srun "$PYTHON" cli.py "$SUBCOMMAND" "${CONFIG_ARGS[@]}" \
    --trainer.accelerator gpu \
    --trainer.num_nodes "$NNODES" \
    --trainer.devices "$GPUS_PER_NODE" \
    --trainer.strategy ddp \
    --trainer.default_root_dir "$ROOT_DIR" \
    ${RESUME[@]+"${RESUME[@]}"} $EXTRA || STATUS=$?

# 143: stopped by SIGTERM after writing last.ckpt; 130: Ctrl-C (SIGINT), same; 0: finished
if [[ "$STATUS" == 143 && "$SUBCOMMAND" == "fit" && -n "${SLURM_JOB_ID:-}" ]]; then
    echo "interrupted by SIGTERM: requeueing job $SLURM_JOB_ID to resume from the checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
