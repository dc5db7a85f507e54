#!/usr/bin/env bash
# Run a command as a client on node K of the cluster multinode_up.sh made: its network namespace, node names
# resolving through BASE/hosts, SLURM_CONF set. Usage: multinode_exec.sh BASE K COMMAND [ARGS...]
BASE=${1:?usage: multinode_exec.sh BASE K COMMAND...}; K=${2:?}; shift 2
read -r NODES PFX < "$BASE/cluster"
exec nsenter --net=/var/run/netns/${PFX}$K unshare --mount sh -c \
  'mount --bind "$0/hosts" /etc/hosts; export SLURM_CONF="$0/slurm.conf"; exec "$@"' "$BASE" "$@"
