#!/usr/bin/env bash
# Start `mcf pretrain` across nodes with the `deepspeed` launcher.
#
#   launchers/deepspeed/launch.sh [launcher options] [--] [mcf pretrain options]
#
# Launcher options (each also read from the environment; the flag wins):
#   --hostfile FILE      nodes and slots, `HOST slots=N` per line (MCF_HOSTFILE; see
#                        hostfile.example). Without one: this node only.
#   --gpus-per-node N    ranks per node, GPUs [0, N)      (GPUS_PER_NODE; default: all slots)
#   --num-nodes N        use the first N hosts           (NUM_NODES; default: all)
#   --include SPEC       deepspeed's host/slot filter, e.g. "node1@node2:0,1"
#   --master-addr A      rank-0 node address             (MASTER_ADDR; default: first host via ssh,
#                                                          127.0.0.1 without a hostfile)
#   --master-port P      rank-0 TCP port                 (MASTER_PORT; default 29500)
#   --no-ssh             no passwordless ssh: run this script once on every node, each with
#   --node-rank R        its index in the hostfile       (NODE_RANK); needs --master-addr
# Everything else goes to `mcf pretrain` unchanged, e.g.
#   launchers/deepspeed/launch.sh --hostfile hosts --gpus-per-node 8 --master-addr 10.0.0.1 \
#       --config base --data /data/faces.lmdb --output-dir /shared/runs/base --zero 2
# The interpreter is $MCF_PYTHON (default: python; with ssh it must exist at the same path on every
# node); extra deepspeed launcher flags go in $MCF_DEEPSPEED_ARGS (e.g. "--bind_cores_to_rank").
set -euo pipefail

PY=${MCF_PYTHON:-python}
HOSTFILE=${MCF_HOSTFILE:-}
GPUS=${GPUS_PER_NODE:-}
NUM_NODES=${NUM_NODES:-}
INCLUDE=
ADDR=${MASTER_ADDR:-}
PORT=${MASTER_PORT:-29500}
NO_SSH=0
NODE_RANK=${NODE_RANK:-}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
need() { [ "$2" -ge 2 ] || { echo "launch.sh: $1 needs a value" >&2; exit 2; }; }

ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --hostfile|-H) need "$1" $#; HOSTFILE=$2; shift 2 ;;
        --gpus-per-node|--gpus_per_node|--num-gpus|--num_gpus) need "$1" $#; GPUS=$2; shift 2 ;;
        --num-nodes|--num_nodes) need "$1" $#; NUM_NODES=$2; shift 2 ;;
        --include|-i) need "$1" $#; INCLUDE=$2; shift 2 ;;
        --master-addr|--master_addr) need "$1" $#; ADDR=$2; shift 2 ;;
        --master-port|--master_port) need "$1" $#; PORT=$2; shift 2 ;;
        --no-ssh|--no_ssh) NO_SSH=1; shift ;;
        --node-rank|--node_rank) need "$1" $#; NODE_RANK=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; ARGS+=("$@"); break ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

DS=(--master_port "$PORT")
if [ -n "$HOSTFILE" ]; then
    [ -r "$HOSTFILE" ] || { echo "launch.sh: hostfile $HOSTFILE not readable" >&2; exit 2; }
    DS+=(--hostfile "$HOSTFILE")
else
    # deepspeed's default hostfile is /job/hostfile; an empty path means "this node only".
    DS+=(--hostfile /dev/null)
fi
[ -n "$GPUS" ] && DS+=(--num_gpus "$GPUS")
[ -n "$NUM_NODES" ] && DS+=(--num_nodes "$NUM_NODES")
[ -n "$INCLUDE" ] && DS+=(--include "$INCLUDE")
[ -n "$ADDR" ] && DS+=(--master_addr "$ADDR")
if [ "$NO_SSH" = 1 ]; then
    [ -n "$HOSTFILE" ] || { echo "launch.sh: --no-ssh needs --hostfile (it defines the nodes)" >&2; exit 2; }
    [ -n "$NODE_RANK" ] || { echo "launch.sh: --no-ssh needs --node-rank" >&2; exit 2; }
    [ -n "$ADDR" ] || { echo "launch.sh: --no-ssh needs --master-addr" >&2; exit 2; }
    DS+=(--no_ssh --node_rank "$NODE_RANK")
fi

# --module runs `python -m mcf pretrain ...`; --no_local_rank: ranks come from the environment
# (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), not a --local_rank flag.
# shellcheck disable=SC2086  # MCF_DEEPSPEED_ARGS is a list of flags
exec "$PY" -m deepspeed.launcher.runner "${DS[@]}" ${MCF_DEEPSPEED_ARGS:-} \
    --no_local_rank --module mcf pretrain "${ARGS[@]}"
