#!/usr/bin/env bash
# Train on several machines under SLURM: one task per node, each writing its own accelerate config
# and running the train stage; node 0 runs it through `dvc repro`, so DVC records the outputs.
#
#   sbatch --nodes=2 --gpus-per-node=8 tools/slurm_train.sh
#
# Before submitting, set in params.yaml (and commit):
#   train.num_processes: 16                           # nodes x GPUs per node
#   train.accelerate_config: /tmp/pubmedqa-accelerate.yaml   # a node-local path, written below
# The project folder must be on a filesystem every node shares (the usual home or scratch), with
# the environment installed (`make install-gpu`). MAIN_PORT (default 29500) must be free on node 0
# and reachable from the other nodes.
#SBATCH --job-name=pubmedqa-train
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
export PATH="$PWD/.venv/bin:$PATH"
export MAIN_IP="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)" MAIN_PORT="${MAIN_PORT:-29500}"
export CONFIG="$(python -c 'from stages.params import load_params; print(load_params().train.accelerate_config or "")')"
[ -n "$CONFIG" ] || { echo "error: set train.accelerate_config in params.yaml (a node-local path)" >&2; exit 2; }

dvc repro prepare                      # once, before any node reads data/prepared
if dvc status --quiet train; then      # up to date: node 0 would not train and the others would wait
    echo "train is up to date"
else
    srun --kill-on-bad-exit=1 bash -c '
        set -euo pipefail
        cat > "$CONFIG" <<EOF
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: $SLURM_NNODES
machine_rank: $SLURM_NODEID
main_process_ip: $MAIN_IP
main_process_port: $MAIN_PORT
rdzv_backend: static
same_network: true
EOF
        if [ "$SLURM_NODEID" = 0 ]; then dvc repro train; else python -m stages.train; fi
    '
fi
dvc repro                              # merge and evaluate, here on node 0
