#!/usr/bin/env bash
# Runs a mage_jax stage on this machine (CPU, or its GPUs/TPU).
#
#   launch/local.sh configs/tokenizer.py:demo /tmp/mage/tokenizer [--config.key=value ...]
#
# SIMULATE_DEVICES=8 splits the CPU into 8 XLA devices to try a pod mesh on a laptop:
#   SIMULATE_DEVICES=8 launch/local.sh configs/pretrain.py:demo /tmp/mage/p --config.mesh.data=2 \
#       --config.mesh.fsdp=2 --config.mesh.tensor=2
# PROCESSES=2 runs that many jax.distributed processes on this machine (gloo collectives).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
if [[ -n "${SIMULATE_DEVICES:-}" ]]; then
  # Simulated devices share the CPU and can reach a collective far apart in time; XLA:CPU
  # would abort the run after its default limit (tests/conftest.py says more). mage_jax.main
  # also widens XLA:CPU's thread pool for them (NPROC; mage_jax/xla_defaults.py says why).
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$SIMULATE_DEVICES --xla_cpu_collective_call_terminate_timeout_seconds=300"
fi
PROCESSES=${PROCESSES:-1}
if [[ "$PROCESSES" -le 1 ]]; then
  exec python -m mage_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
fi
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < PROCESSES; i++)); do
  JAX_PLATFORMS=cpu python -m mage_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --distributed=on --coordinator_address="127.0.0.1:$PORT" \
    --num_processes="$PROCESSES" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
