#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored), the wheels that the GPU machine's image lacks and the
# GPU run imports: diffusers (the reference side), grain + its import-time needs and
# ml-collections (unclip_jax's configs and data, for the train_* parts). The same versions as
# this repository's CPU environment; CPython 3.12 x86-64 like that image. About 11 MB, well
# under the 64 MiB a device call may carry: pass carry [".whl"]; bench/run_gpu.sh installs them.
#
#     bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  diffusers==0.42.1 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0
ls -la .whl && du -sh .whl
