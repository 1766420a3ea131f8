#!/bin/bash
# "Does the decoding matter?" (issue 13): train SmolLM2-135M with the MTLoRA E2E recipe's settings on E2E
# dev-train through our CLI, decode the first N held-out inputs with the authors' beam search and with
# transformers' generate (same adapter, the recipe's beam settings), score both with `structlora score e2e`.
# Results: benchmarks/RESULTS.md, "E2E: the authors' decoding vs transformers' generate".
#   STEPS=20 N=24 OUT=/tmp/dg bash benchmarks/decoding_gap/run.sh       # the recorded CPU budget
#   STEPS=26290 N=55 OUT=runs/dg bash benchmarks/decoding_gap/run.sh     # the recipe's 5 epochs (GPU)
# Every step resumes when re-run (train: --resume from OUT/run/checkpoints; generate appends).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
STEPS=${STEPS:-20}; N=${N:-24}; EVAL_EVERY=${EVAL_EVERY:-5}; OUT=${OUT:-/tmp/structlora-decoding-gap}; DATA=${DATA:-../shared/data}
SL=${STRUCTLORA:-structlora}
# The recipe's 500 warm-up steps of 26,290 (1.9 %), at least 1.
WARMUP=$(( (STEPS * 500 + 26289) / 26290 ))
RESUME=(); [ -d "$OUT/run/checkpoints" ] && RESUME=(--resume)
[ -f "$OUT/run/results.json" ] || $SL train nlg --dataset e2e --model smollm2-135m --data-dir "$DATA" \
  --train-split dev-train --eval-split dev-heldout --config "$HERE/mtlora_smollm2_e2e.yaml" \
  --max-steps "$STEPS" --warmup-steps "$WARMUP" --eval-every "$EVAL_EVERY" --logging-steps 5 --max-eval-examples 8 \
  --output "$OUT/run" "${RESUME[@]}"
for MODE in authors hf; do
  $SL generate --adapter "$OUT/run" --dataset e2e --split dev-heldout --output "$OUT/dec/$MODE.txt" \
    --decoding "$MODE" --beams 10 --length-penalty 0.8 --no-repeat-ngram-size 4 --repetition-penalty 1.0 \
    --max-new-tokens 64 --limit "$N" --batch-size 2 --no-progress
  $SL score e2e --ref "$OUT/dec/$MODE.references.txt" --hyp "$OUT/dec/$MODE.txt" --json | tee "$OUT/dec/$MODE.scores.json"
done
