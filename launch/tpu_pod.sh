#!/usr/bin/env bash
# Runs one mage_jax stage on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/pretrain.py:vit_b gs://BUCKET/runs/mage_b [--config.key=value ...]
#
# Every worker runs the same command; jax.distributed.initialize() discovers the pod by
# itself (main.py's --distributed=auto). The workdir must be shared storage (a GCS bucket):
# orbax writes one checkpoint from all hosts, and metrics are written by process 0.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO_URL=${REPO_URL:-}          # where workers clone the code from (default: copy this checkout)
BRANCH=${BRANCH:-main}
EXTRA=$(printf ' %q' "$@")

if [[ -z "$REPO_URL" ]]; then
  # Ship this checkout (tracked files only) to every worker.
  tar czf /tmp/mage_jax_src.tgz $(git ls-files)
  gcloud compute tpus tpu-vm scp /tmp/mage_jax_src.tgz "$TPU_NAME":~/ --zone "$ZONE" --worker=all
  FETCH="mkdir -p ~/mage_jax && tar xzf ~/mage_jax_src.tgz -C ~/mage_jax"
else
  FETCH="rm -rf ~/mage_jax && git clone -b $BRANCH $REPO_URL ~/mage_jax"
fi

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  $FETCH
  cd ~/mage_jax
  pip install -q -e . 'jax[tpu]'
  python -m mage_jax.main --config=$CONFIG --workdir=$WORKDIR $EXTRA 2>&1 | tee -a ~/mage_jax_run.log
"
