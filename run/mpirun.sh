#!/usr/bin/env bash
# Launch a command (glm-pretrain, glm-preprocess, ...) with Open MPI's mpirun on the slots of a hostfile:
# one rank per slot (one per GPU), no torchrun. Ranks find their rank from mpirun's environment.
#
#   HOSTFILE=hosts.txt run/mpirun.sh glm-pretrain --config run/configs/glm-2b.yaml
#   HOSTFILE=hosts.txt MASTER_ADDR=10.0.0.1 IFACE=ib0 run/mpirun.sh glm-pretrain --config ...
#
# The hostfile lists one node per line with its slots, the first node hosts the rendezvous:
#   node01 slots=8
#   node02 slots=8
# (`localhost slots=4` runs 4 ranks on this machine, a stand-in for several nodes.)
#
# MASTER_ADDR must be an address of the first node that every node can reach. By default it is the
# first hostfile entry resolved with getent; set it when that name resolves to a management-only or
# otherwise unreachable address. It is never guessed from the node's interfaces (that can pick a docker
# bridge). IFACE names the network interface for MPI's own traffic, NCCL and gloo alike
# (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME / Open MPI's btl_tcp_if_include and oob_tcp_if_include).
set -euo pipefail

# ---- knobs (environment variables) ----
HOSTFILE=${HOSTFILE:?set HOSTFILE to an MPI hostfile (lines like "node01 slots=8")}
NP=${NP:-}                     # ranks; default: the sum of the hostfile's slots
MASTER_PORT=${MASTER_PORT:-29500}
IFACE=${IFACE:-}               # e.g. ib0; empty: let MPI, NCCL and gloo choose
MPIRUN_ARGS=${MPIRUN_ARGS:-}   # extra mpirun options, e.g. "--bind-to none"
# ---- end of knobs ----

if [ "$#" -eq 0 ]; then
  echo "usage: HOSTFILE=<hostfile> $0 <command> [args...]" >&2
  exit 2
fi
FIRST_HOST=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
if [ -z "$FIRST_HOST" ]; then
  echo "mpirun.sh: $HOSTFILE lists no host" >&2
  exit 2
fi
if [ -z "${NP}" ]; then
  NP=$(awk '!/^[[:space:]]*(#|$)/ {n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) n = substr($i, 7); s += n}
            END {print s}' "$HOSTFILE")
fi
if [ -z "${MASTER_ADDR:-}" ]; then
  MASTER_ADDR=$(getent ahostsv4 "$FIRST_HOST" | awk '{print $1; exit}')
  if [ -z "$MASTER_ADDR" ]; then
    echo "mpirun.sh: cannot resolve $FIRST_HOST; set MASTER_ADDR to its address" >&2
    exit 2
  fi
fi
export MASTER_ADDR MASTER_PORT
EXPORTS=(-x MASTER_ADDR -x MASTER_PORT -x PATH)
for name in PYTHONPATH LD_LIBRARY_PATH VIRTUAL_ENV OMP_NUM_THREADS DS_ACCELERATOR TRITON_INTERPRET HF_HUB_OFFLINE; do
  if [ -n "${!name:-}" ]; then EXPORTS+=(-x "$name"); fi
done
MCA=()
if [ -n "$IFACE" ]; then
  export NCCL_SOCKET_IFNAME="$IFACE" GLOO_SOCKET_IFNAME="$IFACE"
  EXPORTS+=(-x NCCL_SOCKET_IFNAME -x GLOO_SOCKET_IFNAME)
  MCA=(--mca btl_tcp_if_include "$IFACE" --mca oob_tcp_if_include "$IFACE")
fi
ROOT_OK=()
if [ "$(id -u)" = 0 ]; then ROOT_OK=(--allow-run-as-root); fi  # containers often run as root

echo "mpirun.sh: $NP ranks from $HOSTFILE, master $FIRST_HOST ($MASTER_ADDR:$MASTER_PORT)" >&2
# shellcheck disable=SC2086
exec mpirun "${ROOT_OK[@]}" --hostfile "$HOSTFILE" -np "$NP" --map-by slot "${MCA[@]}" "${EXPORTS[@]}" \
  $MPIRUN_ARGS "$@"
