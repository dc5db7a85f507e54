#!/usr/bin/env bash
# A real N-node Slurm on one machine for the multi-node tests: one network namespace per node (its own address and
# host name), joined by veth pairs to a bridge in a namespace of its own; munge (shared socket), slurmctld on node1,
# one slurmd per node. Every address lives inside these namespaces: nothing routes outside.
# Usage (as root): multinode_up.sh BASE NODES PREFIX ; commands then run in a node with multinode_exec.sh.
# - `ip netns exec` remounts /sys and hides the cgroup hierarchy slurmd needs: nodes are entered with nsenter.
# - slurmctld insists that its host name is SlurmctldHost: each daemon gets a UTS namespace named after its node.
# - Job steps inherit slurmd's namespaces; a private mount namespace binds BASE/hosts over /etc/hosts, so node names
#   resolve for torchrun's rendezvous without touching the machine's /etc/hosts.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
BASE=${1:?usage: multinode_up.sh BASE NODES PREFIX}; NODES=${2:-2}; PFX=${3:-umn}
NET=${MULTINODE_NET:-10.213.0}
CPUS=${MULTINODE_CPUS:-2}
mkdir -p "$BASE"/{spool/ctld,log,run}
echo "$NODES $PFX" > "$BASE/cluster"  # read by multinode_down.sh and multinode_exec.sh
ip netns add ${PFX}br
ip -n ${PFX}br link add br0 type bridge
ip -n ${PFX}br link set br0 up
ip -n ${PFX}br link set lo up
echo "127.0.0.1 localhost" > "$BASE/hosts"
for k in $(seq 1 "$NODES"); do
  ns=${PFX}$k
  ip netns add $ns
  ip link add ${PFX}v$k type veth peer name ${PFX}p$k
  ip link set ${PFX}v$k netns $ns
  ip link set ${PFX}p$k netns ${PFX}br
  ip -n ${PFX}br link set ${PFX}p$k master br0
  ip -n ${PFX}br link set ${PFX}p$k up
  ip -n $ns addr add $NET.$k/24 dev ${PFX}v$k
  ip -n $ns link set ${PFX}v$k up
  ip -n $ns link set lo up
  echo "$NET.$k node$k" >> "$BASE/hosts"
  mkdir -p "$BASE/spool/dnode$k"
done
munge_up
{
cat <<CONF
ClusterName=uniemox-mn
SlurmctldHost=node1($NET.1)
CONF
common_conf
cat <<CONF
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
StateSaveLocation=$BASE/spool/ctld
SlurmdSpoolDir=$BASE/spool/d%n
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldPort=${MULTINODE_CTLD_PORT:-6917}
SlurmdPort=${MULTINODE_SLURMD_PORT:-6918}
CONF
for k in $(seq 1 "$NODES"); do echo "NodeName=node$k NodeAddr=$NET.$k CPUs=$CPUS RealMemory=4000 State=UNKNOWN"; done
echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
} > "$BASE/slurm.conf"
mkdir -p /tmp/ray
start() {  # node k, command: in the node's network namespace, with its own host name, /etc/hosts view and
           # /tmp/ray (Ray keeps per-host state there: nodes sharing it would find each other's sessions)
  mkdir -p "$BASE/tmp-ray/node$1"
  nsenter --net=/var/run/netns/${PFX}$1 unshare --uts --mount sh -c \
    "mount --bind $BASE/hosts /etc/hosts; mount --bind $BASE/tmp-ray/node$1 /tmp/ray; hostname node$1; $2"
}
start 1 "setsid slurmctld -f $BASE/slurm.conf"
for k in $(seq 1 "$NODES"); do start $k "setsid slurmd -f $BASE/slurm.conf -N node$k"; done
for i in $(seq 150); do
  idle=$(nsenter --net=/var/run/netns/${PFX}1 env SLURM_CONF=$BASE/slurm.conf sinfo -h -N -o %T 2>/dev/null \
         | grep -c idle || true)
  [ "$idle" = "$NODES" ] && exit 0
  sleep 0.2
done
echo "the $NODES-node cluster did not come up; logs in $BASE/log" >&2
exit 1
