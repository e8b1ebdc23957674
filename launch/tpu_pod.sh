#!/usr/bin/env bash
# Kept for old habits: the TPU launcher is launch/tpu_pod.py (create the slice through
# queued resources, ship, install, run, --watch to resume after preemption, --delete).
#   launch/tpu_pod.sh --name=mage-b --zone=us-east5-a --accelerator_type=v5p-16 \
#       --runtime_version=v2-alpha-tpuv5 --config=configs/pretrain.py:vit_b \
#       --workdir=gs://BUCKET/runs/mage_b --watch [-- --config.key=value ...]
# python launch/tpu_pod.py --help lists every flag.
exec python "$(dirname "$0")/tpu_pod.py" "$@"
