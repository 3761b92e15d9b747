#!/usr/bin/env bash
# Start `mcf pretrain` on one node with torchrun, one process per GPU (or N CPU processes).
#
#   launchers/torchrun.sh [launcher options] [--] [mcf pretrain options]
#
# Launcher options (each also read from the environment; the flag wins):
#   --nproc-per-node N   processes on this node   (NPROC_PER_NODE; default: the GPUs torch sees, else 1)
#   --nnodes N           nodes in the run          (NNODES; default 1)
#   --node-rank R        this node's index         (NODE_RANK; default 0)
#   --master-addr A      rank-0 node address       (MASTER_ADDR; default 127.0.0.1)
#   --master-port P      rank-0 TCP port           (MASTER_PORT; default 29500)
#   --dry-run            print the torchrun command instead of running it
# Everything else is passed to `mcf pretrain` unchanged, e.g.
#   launchers/torchrun.sh --nproc-per-node 8 --config base --data /data/faces.lmdb --output-dir runs/base
# The interpreter is $MCF_PYTHON, else the repository's .venv/bin/python (what `make demo` made),
# else the first python3/python on PATH that imports torch and mcf; --dry-run checks it too.
# Extra torchrun flags go in $MCF_TORCHRUN_ARGS.
# With --nnodes > 1, start the script once per node with its --node-rank (static rendezvous).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
NPROC=${NPROC_PER_NODE:-}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
ADDR=${MASTER_ADDR:-127.0.0.1}
PORT=${MASTER_PORT:-29500}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
need() { [ "$2" -ge 2 ] || { echo "torchrun.sh: $1 needs a value" >&2; exit 2; }; }

DRY_RUN=0
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nproc-per-node|--nproc_per_node) need "$1" $#; NPROC=$2; shift 2 ;;
        --nnodes) need "$1" $#; NNODES=$2; shift 2 ;;
        --node-rank|--node_rank) need "$1" $#; NODE_RANK=$2; shift 2 ;;
        --master-addr|--master_addr) need "$1" $#; ADDR=$2; shift 2 ;;
        --master-port|--master_port) need "$1" $#; PORT=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; ARGS+=("$@"); break ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

# an interpreter that has torch and mcf: a bare `python` on a cluster node often has neither
has_mcf() { "$1" -c 'import torch, mcf' >/dev/null 2>&1; }
if [ -n "${MCF_PYTHON:-}" ]; then
    PY=$MCF_PYTHON
else
    PY=
    for cand in "$ROOT/.venv/bin/python" python3 python; do
        if command -v "$cand" >/dev/null 2>&1 && has_mcf "$cand"; then PY=$cand; break; fi
    done
    [ -n "$PY" ] || { echo "torchrun.sh: no python with torch and mcf found (tried $ROOT/.venv/bin/python, python3," \
        "python); run \`make demo\` or \`source .venv/bin/activate\`, or set MCF_PYTHON" >&2; exit 2; }
fi
has_mcf "$PY" || { echo "torchrun.sh: MCF_PYTHON=$PY cannot import torch and mcf" \
    "($("$PY" -c 'import torch, mcf' 2>&1 | tail -n 1));" \
    "point MCF_PYTHON at the environment mcf is installed in" >&2; exit 2; }

if [ -z "$NPROC" ]; then
    # the GPUs torch will see: CUDA_VISIBLE_DEVICES applies (nvidia-smi -L lists every GPU of the node)
    NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || true)
    [[ "$NPROC" =~ ^[0-9]+$ ]] && [ "$NPROC" -ge 1 ] || NPROC=1
fi

# shellcheck disable=SC2086  # MCF_TORCHRUN_ARGS is a list of flags
CMD=("$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC"
     --master-addr "$ADDR" --master-port "$PORT" ${MCF_TORCHRUN_ARGS:-} -m mcf pretrain "${ARGS[@]}")
if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "${CMD[@]}"; echo
    exit 0
fi
exec "${CMD[@]}"
