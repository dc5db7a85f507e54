#!/usr/bin/env bash
# Stops the daemons cluster_up.sh started (munged stays: other users of the machine may need it).
BASE=${1:?usage: cluster_down.sh BASE}
for p in slurmd slurmctld; do
  f=$BASE/run/$p.pid
  [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null
done
for i in $(seq 50); do pgrep -f "slurm(ctld|d) -f $BASE" >/dev/null || exit 0; sleep 0.2; done
pkill -KILL -f "slurm(ctld|d) -f $BASE" || true
