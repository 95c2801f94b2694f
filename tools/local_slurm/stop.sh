#!/usr/bin/env bash
# Stop the cluster started by tools/local_slurm/start.sh (same LOCAL_SLURM_BASE).
#
# Cancels queued and running jobs, then stops slurmd, slurmctld and munged by the pids in
# their pid files (SIGTERM, SIGKILL after 10 s). Safe to run when nothing is running.
# LOCAL_SLURM_PURGE=1 also deletes the base directory (config, state, logs, munge key).
set -uo pipefail

BASE=${LOCAL_SLURM_BASE:-${TMPDIR:-/tmp}/megatron-opd-slurm}
export SLURM_CONF=$BASE/etc/slurm.conf
log() { echo "[local_slurm/stop $(date +%T)] $*" >&2; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [ -f "$SLURM_CONF" ] && alive "$BASE/run/slurmctld.pid"; then
  mapfile -t job_ids < <(squeue -h -o %i 2>/dev/null)
  if [ "${#job_ids[@]}" -gt 0 ]; then
    log "scancel ${job_ids[*]}"
    scancel "${job_ids[@]}"
    for _ in $(seq 50); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.1
    done
  fi
fi

stop_daemon() { # name pidfile
  local name=$1 pidfile=$2 pid
  if ! alive "$pidfile"; then
    log "$name not running"
    rm -f "$pidfile"
    return
  fi
  pid=$(cat "$pidfile")
  log "stopping $name (pid $pid)"
  kill -TERM "$pid"
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name still alive after 10 s: SIGKILL"
    kill -KILL "$pid"
  fi
  rm -f "$pidfile"
}
stop_daemon slurmd "$BASE/run/slurmd.pid"
stop_daemon slurmctld "$BASE/run/slurmctld.pid"
stop_daemon munged "$BASE/munge/munged.pid"

if [ "${LOCAL_SLURM_PURGE:-0}" = 1 ]; then
  log "removing $BASE"
  rm -rf "$BASE"
fi
log "stopped"
