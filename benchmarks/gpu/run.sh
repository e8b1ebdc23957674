#!/usr/bin/env bash
# The accelerator check of issue 11, for the `device` tool (one NVIDIA H100/H200), in one
# call of about 10 minutes:
#
#   here:    benchmarks/gpu/wheels.sh
#   device:  run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=600)
#
# Trains ViT-B and ViT-L (paper presets, 256 px, online tokenization, synthetic data) in
# bf16 with and without rematerialisation and with cuDNN attention
# (jax.nn.dot_product_attention, which has no attention dropout, so those runs set
# dropout 0), then times the generation stage's sampler. Each run's JSON (images/s, MFU
# against the GPU's peak bf16 rate, peak memory) and a markdown table land in $OUT (the
# device tool brings them back) or in benchmarks/results/gpu/ elsewhere.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

train() {  # name, then config overrides
  local name=$1; shift
  echo "== $name"
  timeout 150 python3 benchmarks/train_throughput.py --output_dir="$OUT" --name="$name" \
    --steps=10 --warmup=2 "$@" --config.model.dtype=bfloat16 2>&1 | tail -3
}
VIT_B="--config=configs/pretrain.py:vit_b --config.batch_size=256"
VIT_L="--config=configs/pretrain.py:vit_l --config.batch_size=128"
FUSED="--config.model.fused_attention=True --config.model.dropout_rate=0"
train "vit_b bf16" $VIT_B
train "vit_b bf16 remat" $VIT_B --config.model.remat=True
train "vit_b bf16 cudnn attention" $VIT_B $FUSED
train "vit_l bf16" $VIT_L
train "vit_l bf16 remat" $VIT_L --config.model.remat=True
train "vit_l bf16 remat cudnn attention" $VIT_L --config.model.remat=True $FUSED
echo "== sampler"
timeout 120 python3 benchmarks/sample_throughput.py --preset=vit_b --batch_size=256 \
  --num_steps=12 --output_dir="$OUT" 2>&1 | tail -3
python3 benchmarks/train_throughput.py --summarize --output_dir="$OUT" | tee "$OUT/table.md"
