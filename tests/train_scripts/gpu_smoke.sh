#!/usr/bin/env bash
# Device check of the trainer on one GPU (not run by pytest or CI):
#   bf16 toy run with MFU, resume onto the same GPU, and the prior stage's tiny config.
# Needs the wheels in .whl/ (ml_collections, tensorboardX, grain) on a machine without them.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_smoke}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices()[0].device_kind)"
TOY="--config=tests/train_scripts/toy_config.py --config.model.dtype=bfloat16 --config.model.hidden=4096
  --config.data.dim=256 --config.data.num_examples=65536 --config.train.batch_size=1024
  --config.train.ckpt_every=100 --config.train.log_every=50 --config.train.sample_every=100
  --config.mesh.fsdp_min_size=16384"
echo "== toy bf16, 200 steps"
timeout 240 python3 train.py $TOY --workdir="$OUT/toy" --config.train.steps=200 2>&1 | grep -v "^train:" | tail -n 15
echo "== resume to 300 steps"
timeout 180 python3 train.py $TOY --workdir="$OUT/toy" --config.train.steps=300 2>&1 | grep -v "^train:" | tail -n 15
python3 - "$OUT/toy/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()
           if k in ("step", "loss", "lr", "compile_time_s", "step_time_s", "examples_per_s", "mfu", "grad_norm")})
PY
ls "$OUT/toy/samples" "$OUT/toy/checkpoints"
echo "== prior stage, tiny"
timeout 200 python3 train.py --config=configs/prior.py:tiny --workdir="$OUT/prior" --config.train.steps=100 \
  --config.train.log_every=50 --config.train.ckpt_every=100 2>&1 | grep -v "^train:" | tail -n 25
tail -n 2 "$OUT/prior/metrics.jsonl" 2>/dev/null
