#!/usr/bin/env bash
# Run HERE (a machine with pip access), in the repository root, before benchmarks/gpu/run.sh
# goes to a GPU machine that cannot download. Fetches, as Python 3.12 x86-64 wheels into
# .whl/ (ignored by git), the packages mage_jax needs that the workplace's GPU image lacks
# (it has jax, flax, optax, orbax, absl, numpy, scipy, pillow, tensorboard, etils;
# ../.library/device/KINDS.md). TensorFlow is not among them: the train step's modules do
# not import it (mage_jax/metrics.py says why), and the benchmarks use synthetic data.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
# Compiled packages as wheels for the GPU machine's Python; pure-Python ones as wheels built
# here (promise publishes only a source archive).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d .whl grain array-record dm-tree
python3 -m pip wheel -q --no-deps -w .whl \
  ml-collections clu tensorflow-datasets portpicker immutabledict promise simple-parsing \
  docstring-parser tensorflow-metadata googleapis-common-protos termcolor toml
du -sh .whl
