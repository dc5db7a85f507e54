#!/usr/bin/env bash
# A real single-node Slurm (munge + slurmctld + slurmd, no accounting) under BASE, for the test fixture.
# Usage (as root, packages installed by `make debs`): cluster_up.sh BASE ; then export SLURM_CONF=BASE/slurm.conf
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
BASE=${1:?usage: cluster_up.sh BASE}
mkdir -p "$BASE"/{spool/ctld,spool/d,log,run}
munge_up
# The node declares 16 CPUs whatever the machine has (SlurmdParameters=config_overrides), so a test can ask for
# more CPUs than these few cores and check what the job is given; nothing binds processes to them (task/none).
NODE_CPUS=${NODE_CPUS:-16}
MEM=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 9 / 10 ))
{
cat <<CONF
ClusterName=uniemox-test
SlurmctldHost=localhost
CONF
common_conf
cat <<CONF
SlurmdParameters=config_overrides
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
StateSaveLocation=$BASE/spool/ctld
SlurmdSpoolDir=$BASE/spool/d
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
NodeName=localhost NodeHostname=$(hostname) NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
} > "$BASE/slurm.conf"
export SLURM_CONF=$BASE/slurm.conf
setsid slurmctld -f "$SLURM_CONF"
setsid slurmd -f "$SLURM_CONF" -N localhost
for i in $(seq 150); do sinfo -h -o %T 2>/dev/null | grep -q idle && exit 0; sleep 0.2; done
echo "slurm did not come up; logs in $BASE/log" >&2
exit 1
