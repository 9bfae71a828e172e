# The GPU benchmark of unclip_jax against diffusers' UnCLIPPipeline, one command:
#
#   bash bench/run_gpu.sh OUTDIR            (run from the repository root; OUTDIR e.g. $OUT)
#
# Parts, in priority order, each a separate process under `timeout`, each writing
# OUTDIR/<part>.jsonl (+ <part>.log); a part that fails or times out is recorded in
# OUTDIR/parts.jsonl and the next part runs. A part starts only while the whole run has
# at least its minimum time left of BENCH_BUDGET_S (default 450 s). At the end
# bench/report.py writes OUTDIR/summary.md and summary.json (ratios, targets, failures).
#
#   diffusers_eager    diffusers fp16 eager, batches 1,8,32                 (~90 s)
#   ours_cold          ours bf16, empty compilation cache: compile + time at 8,32,1
#                      (every batch through jax.export when `flatbuffers` imports)      (~200 s)
#   ours_warm          ours again in a fresh process: compile from the persistent cache,
#                      peak memory per batch (ascending, no autotuning) for the batches
#                      ours_cold finished; the FLOP count of the program        (~70 s)
#   profile            one profiled cascade call per cached batch (bench/profile.py): device time by
#                      stage and kind of kernel, the trace and HLO in OUTDIR/profile/  (~40 s)
#   train_prior        prior training step, batch 1024                      (~60 s)
#   train_prior_dots   the same with remat_policy 'dots' (Dense outputs kept)  (~60 s)
#   train_decoder      decoder training step (64px), batch 64 ('convs' compiled in 135 s on an H200) (~200 s)
#   train_decoder_convs  the same with remat_policy 'convs' (conv + Dense outputs kept)   (~200 s)
#   ours_pipeline      the user API (unclip_jax.pipeline.UnCLIPPipeline.text_to_image) at 8 (~90 s)
#   ours_xla           ours with attention implementation 'xla' at batch 8  (~90 s)
#   ours_fastnorm      ours with one-pass GroupNorm statistics (--fast-norm) at batch 8 (~90 s)
#   diffusers_compile  diffusers fp16 + torch.compile at batch 8            (~200 s+)
#   ours_stage_compile (only when BENCH_PARTS names it) each stage compiled as its own
#                      program at batch 8, no cache: where a cold compile spends its time (~90 s)
#
# Environment: BENCH_PARTS (space-separated subset, default all), BENCH_BUDGET_S,
# BENCH_BATCHES (sampling batches of diffusers_eager and ours_cold, e.g. 8,32),
# BENCH_PRIOR_BATCH, BENCH_DECODER_BATCH; BENCH_SIZE=tiny runs the same parts with the
# tiny architecture in fp32 at batch 1, one timed call (a CPU dry run of this script).
set -u
# Packages the GPU image lacks (diffusers, grain, ml-collections, ...) travel as wheels in
# .whl/ (see the device README); installed only where that folder holds any.
if compgen -G ".whl/*.whl" > /dev/null && [[ "${BENCH_SIZE:-karlo}" != tiny ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
OUT="${1:?usage: bash bench/run_gpu.sh OUTDIR}"
mkdir -p "$OUT"
BUDGET="${BENCH_BUDGET_S:-450}"
PARTS=" ${BENCH_PARTS:-diffusers_eager ours_cold ours_warm profile train_prior train_prior_dots train_decoder train_decoder_convs ours_pipeline ours_xla ours_fastnorm diffusers_compile} "
CACHE=/tmp/unclip_bench_jax_cache
rm -rf "$CACHE"
# JAX allocates on demand (up to 90% of the GPU): peak_bytes_in_use then counts what our
# programs use. Torch and JAX run in separate processes, one after the other.
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 TF_CPP_MIN_LOG_LEVEL=1
T0=$(date +%s)

if [[ "${BENCH_SIZE:-karlo}" == tiny ]]; then
  SIZE=tiny; DIFF="--tiny --dtype fp32"; OURS="--size tiny --dtype float32 --param-dtype float32"
  COLD=1; WARM=1; EXPORT_B=1; EAGER_B=1; COMPILE_B=1; TRAIN="--config-variant tiny"; REPS=1
  PRIOR_B=${BENCH_PRIOR_BATCH:-8}; DECODER_B=${BENCH_DECODER_BATCH:-4}
else
  SIZE=karlo; DIFF="--dtype fp16"; OURS="--size karlo"
  COLD=${BENCH_BATCHES:-8,32,1}; WARM=1,8,32; EXPORT_B=8; EAGER_B=${BENCH_BATCHES:-1,8,32}; COMPILE_B=8; TRAIN=""; REPS=2
  PRIOR_B=${BENCH_PRIOR_BATCH:-1024}; DECODER_B=${BENCH_DECODER_BATCH:-64}
fi
EXPORTED=""
# Every sampling batch goes through jax.export, so the second process traces no Python
# (the session 3 run exported batch 8 only: 4.2 s warm start there, 7.7 s at batch 32).
if python3 -c "import flatbuffers" 2>/dev/null; then EXPORTED="--exported-batches $COLD"; fi
echo "size $SIZE, budget ${BUDGET}s, parts:$PARTS"

run_part() {  # name min_seconds cap_seconds command...
  local name=$1 min=$2 cap=$3
  shift 3
  case "$PARTS" in *" $name "*) ;; *) return 0 ;; esac
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if (( left < min )); then
    echo "{\"part\": \"$name\", \"status\": \"skipped\", \"reason\": \"${left}s of the budget left, needs ${min}s\"}" >> "$OUT/parts.jsonl"
    echo "== $name skipped (${left}s left)"
    return 0
  fi
  local limit=$(( cap < left ? cap : left ))
  echo "== $name (limit ${limit}s)"
  local start=$(date +%s)
  timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status=failed; fi
  echo "{\"part\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"limit_s\": $limit}" >> "$OUT/parts.jsonl"
  grep -h '"kind": "\(sampling\|training\|compile\|error\|profile\)' "$OUT/$name.jsonl" 2>/dev/null | cut -c1-700
  if [[ $status != ok ]]; then tail -n 5 "$OUT/$name.log"; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1

run_part diffusers_eager 60 150 python3 -m bench.anchor_diffusers_unclip $DIFF --batches $EAGER_B --reps $REPS \
  --out "$OUT/diffusers_eager.jsonl"
run_part ours_cold 120 270 python3 -m bench.sampling $OURS --batches $COLD --reps $REPS --attention auto \
  --cache-dir "$CACHE" $EXPORTED --no-flops --out "$OUT/ours_cold.jsonl"
# The warm start loads what the first process compiled: its batches, ascending (peak memory).
DONE=$(python3 -c "import json, sys
try: records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
except (OSError, ValueError): records = []
print(','.join(str(b) for b in sorted({r['batch'] for r in records if r.get('kind') == 'sampling'})))" "$OUT/ours_cold.jsonl")
if [[ -z "$DONE" && "$PARTS" == *" ours_warm "* ]]; then
  echo '{"part": "ours_warm", "status": "skipped", "reason": "ours_cold finished no batch: nothing cached to load"}' >> "$OUT/parts.jsonl"
  PARTS=${PARTS/ ours_warm / }
fi
WARM=${DONE:-$WARM}
run_part ours_warm 40 120 python3 -m bench.sampling $OURS --batches $WARM --reps 1 --attention auto \
  --cache-dir "$CACHE" $EXPORTED --warm-start --out "$OUT/ours_warm.jsonl"
run_part profile 30 90 python3 -m bench.profile $OURS --batches "${DONE:-$WARM}" --attention auto \
  --cache-dir "$CACHE" $EXPORTED --trace-dir "$OUT/profile" --out "$OUT/profile.jsonl"
run_part train_prior 50 120 python3 -m bench.training --stage prior $TRAIN --batch "$PRIOR_B" --steps 5 \
  --out "$OUT/train_prior.jsonl"
run_part train_prior_dots 50 120 python3 -m bench.training --stage prior $TRAIN --batch "$PRIOR_B" --steps 5 \
  --remat-policy dots --out "$OUT/train_prior_dots.jsonl"
run_part train_decoder 80 240 python3 -m bench.training --stage decoder $TRAIN --batch "$DECODER_B" --steps 5 \
  --out "$OUT/train_decoder.jsonl"
run_part train_decoder_convs 80 240 python3 -m bench.training --stage decoder $TRAIN --batch "$DECODER_B" --steps 5 \
  --remat-policy convs --out "$OUT/train_decoder_convs.jsonl"
run_part ours_pipeline 90 150 python3 -m bench.sampling $OURS --api pipeline --batches $EXPORT_B --reps $REPS \
  --no-flops --out "$OUT/ours_pipeline.jsonl"
run_part ours_xla 90 150 python3 -m bench.sampling $OURS --batches $EXPORT_B --reps $REPS --attention xla --no-flops \
  --out "$OUT/ours_xla.jsonl"
run_part ours_fastnorm 90 150 python3 -m bench.sampling $OURS --batches $EXPORT_B --reps $REPS --attention auto \
  --fast-norm --no-flops --out "$OUT/ours_fastnorm.jsonl"
run_part ours_stage_compile 90 150 python3 -m bench.sampling $OURS --batches $EXPORT_B --attention auto \
  --compile-by-stage --out "$OUT/ours_stage_compile.jsonl"
run_part diffusers_compile 180 300 python3 -m bench.anchor_diffusers_unclip $DIFF --batches $COMPILE_B --reps $REPS \
  --compile --out "$OUT/diffusers_compile.jsonl"

timeout 60 python3 -m bench.report "$OUT" > "$OUT/report.log" 2>&1 || tail -n 20 "$OUT/report.log"
cat "$OUT/summary.md" 2>/dev/null
echo "total $(( $(date +%s) - T0 ))s"
