#!/usr/bin/env bash
# Undo multinode_up.sh: stop its daemons (and any job process left in its namespaces), delete the namespaces.
BASE=${1:?usage: multinode_down.sh BASE}
read -r NODES PFX < "$BASE/cluster" || exit 0
for f in "$BASE"/run/slurmd-*.pid "$BASE"/run/slurmctld.pid; do [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
for i in $(seq 50); do pgrep -f "slurm(ctld|d) -f $BASE" >/dev/null || break; sleep 0.2; done
pkill -KILL -f "slurm(ctld|d) -f $BASE" 2>/dev/null
for k in $(seq 1 "$NODES") br; do
  pids=$(ip netns pids ${PFX}$k 2>/dev/null)
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  ip netns del ${PFX}$k 2>/dev/null
done
exit 0
