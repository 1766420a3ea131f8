#!/usr/bin/env bash
# Issue 15's GPU measurements in two short commands (a lent GPU comes with minutes, not hours).
#
#   bash benchmarks/gpu_run.sh check   # versions; engine/bank/norm tests on CUDA; cuda_check bf16+fp16;
#                                      # step_time at the 7B shape, eager, every method, profiled
#   (SKIP_TESTS=1 skips the pytest part)
#   bash benchmarks/gpu_run.sh more    # 7B floor/LoRA/LoRETTA_rep with torch's default AdamW and fused; step_time
#                                      # at the 1B shape, eager, profiled; compiled floor and LoRA q,v at 1B
#
# Results go to $OUT (default runs/gpu). Optional wheels in .whl/ (the transformers and peft versions the CPU
# suite runs) are installed to /tmp/site first, and used where they import.
set -u
part=${1:?usage: gpu_run.sh check|more}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/log_$part.txt"
PY=${PY:-python3}

site=""
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$log" 2>&1 && PYTHONPATH=/tmp/site $PY -c "import transformers, peft" >>"$log" 2>&1 && site=/tmp/site:
fi
export PYTHONPATH="${site}$PWD/src"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| carried wheels used:', bool('$site'))"
} >>"$OUT/env.txt" 2>&1

case "$part" in
  check)
    [ -n "${SKIP_TESTS:-}" ] || STRUCTLORA_TEST_DEVICE=cuda timeout 150 $PY -m pytest -q -p no:cacheprovider -x --timeout 120 \
      tests/test_engine.py tests/test_bank.py tests/test_norms.py >"$OUT/cuda_tests.txt" 2>&1 \
      || STRUCTLORA_TEST_DEVICE=cuda timeout 150 $PY -m pytest -q -p no:cacheprovider \
           tests/test_engine.py tests/test_bank.py tests/test_norms.py >>"$OUT/cuda_tests.txt" 2>&1
    [ -n "${SKIP_TESTS:-}" ] || tail -3 "$OUT/cuda_tests.txt"
    timeout 120 $PY benchmarks/cuda_check.py --device cuda --dtypes bfloat16,float16 --json "$OUT/cuda_check.json" \
      >"$OUT/cuda_check.md" 2>>"$log"
    tail -20 "$OUT/cuda_check.md"
    timeout 330 $PY benchmarks/step_time.py --device cuda --shape 7b --steps 6 --warmup 2 --profile /tmp/prof7b \
      --json "$OUT/step_7b.json" --markdown "$OUT/step_7b.md" 2>>"$log"
    tar czf "$OUT/profiles_7b.tgz" -C /tmp prof7b 2>/dev/null
    ;;
  more)
    # The optimizer's host work per tensor (LoRETTA's many small cores): torch's default AdamW against fused,
    # the floor and LoRA beside them, in one process on one machine.
    for impl in default fused; do
      timeout 100 $PY benchmarks/step_time.py --device cuda --shape 7b --steps 6 --warmup 2 --no-throwaway \
        --methods floor,lora,loretta_rep --adamw $impl --profile /tmp/prof/7b_$impl \
        --json "$OUT/step_7b_adamw_$impl.json" 2>>"$log" | tail -12
    done
    timeout 110 $PY benchmarks/step_time.py --device cuda --shape 1b --steps 8 --warmup 2 --profile /tmp/prof/1b \
      --json "$OUT/step_1b.json" 2>>"$log" | tail -40
    tar czf "$OUT/profiles_more.tgz" -C /tmp prof 2>/dev/null
    timeout 110 $PY benchmarks/step_time.py --device cuda --shape 1b --compile --no-eager --no-throwaway \
      --targets qv --methods floor,lora --steps 8 --warmup 3 --json "$OUT/step_1b_compiled.json" 2>>"$log" | tail -8
    ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
tail -5 "$log"
