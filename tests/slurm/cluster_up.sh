#!/usr/bin/env bash
# A real single-node Slurm (munge + slurmctld + slurmd, no accounting) under BASE, for the test fixture.
# Usage (as root, packages installed by `make debs`): cluster_up.sh BASE ; then export SLURM_CONF=BASE/slurm.conf
set -euo pipefail
BASE=${1:?usage: cluster_up.sh BASE}
mkdir -p "$BASE"/{spool/ctld,spool/d,log,run}
[ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null;
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
mkdir -p /run/munge && chown munge:munge /run/munge
pgrep -x munged >/dev/null || setsid runuser -u munge -- /usr/sbin/munged
NODE_CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 9 / 10 ))
cat > "$BASE/slurm.conf" <<CONF
ClusterName=uniemox-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
MinJobAge=600
KillWait=30
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
export SLURM_CONF=$BASE/slurm.conf
setsid slurmctld -f "$SLURM_CONF"
setsid slurmd -f "$SLURM_CONF" -N localhost
for i in $(seq 150); do sinfo -h -o %T 2>/dev/null | grep -q idle && exit 0; sleep 0.2; done
echo "slurm did not come up; logs in $BASE/log" >&2
exit 1
