# Shared by cluster_up.sh and multinode_up.sh (sourced): munge, and the slurm.conf settings every test cluster uses.
munge_up() {  # a key (made once), the socket directory, one munged
  [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null;
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  mkdir -p /run/munge && chown munge:munge /run/munge
  pgrep -x munged >/dev/null || setsid runuser -u munge -- /usr/sbin/munged
}

common_conf() {  # root daemons, munge auth, no accounting or cgroups, cores as the unit, fast backfill
  cat <<'CONF'
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
CONF
}
