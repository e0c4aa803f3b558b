#!/usr/bin/env bash
# Runs N processes of a teacherlm_jax entry point on this machine, as one multi-process JAX job (gloo collectives on
# CPU): what a multi-host pod does, on a laptop.
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS python -m teacherlm_jax.train --gin_file=... --gin.X=...
#
# Each process gets --coordinator_address=localhost:PORT --num_processes=N --process_id=I appended, and
# DEVICES_PER_PROCESS CPU devices (XLA_FLAGS). Logs go to $LOG_DIR/process_I.log (default: a temp dir). Exits
# non-zero if any process fails; stopping the launcher stops them all.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,10p' "$0"; exit 2
fi
num_processes=$1; devices=$2; shift 2
port=${COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}
log_dir=${LOG_DIR:-$(mktemp -d -t teacherlm_local_XXXX)}
mkdir -p "$log_dir"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    "$@" --coordinator_address="localhost:$port" --num_processes="$num_processes" --process_id="$i" \
    > "$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "launched $num_processes processes (coordinator localhost:$port); logs in $log_dir"
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $log_dir/process_$i.log" >&2
    status=1
  fi
done
exit $status
