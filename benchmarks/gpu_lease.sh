#!/usr/bin/env bash
# The GPU benchmarks of issues 2, 4, 5, 13 and 14 in one call on a lent GPU machine (benchmarks/README.md):
#   bash benchmarks/gpu_lease.sh            # writes logs and JSON under $OUT (default benchmarks/out/gpu)
#   STAGES="models train" UNET_ONLY=1 TRAIN_BATCH=8 bash benchmarks/gpu_lease.sh   # a subset
# Stages: tudsr (TUDSR 128->512 and ->1024 ms/img and MFU, JAX only: the GPU image may lack peft),
# mmdit (SD3.5-M forward at 512, bf16 ms/img and MFU), train (the OMGSR-S train step), models and
# inference (OMGSR-S parts and generator: measured on 2026-11-29, so not in the default list).
# Each stage runs in its own process under its own time limit, so one failure or overrun keeps the
# others' figures. Missing pure-Python packages travel as wheels in .whl/ (installed to /tmp/site).
# The train step runs first (it never got measured: its compile outlasted the 2026-11-29 lease).
# Compile time: JAX's persistent compilation cache is shared by all stages (a rerun in the same
# lease reuses every compiled program), and the train stage compiles with XLA's GEMM autotuning
# reduced (TRAIN_XLA_FLAGS: cuBLAS GEMMs instead of autotuned Triton ones, autotune level 1), so the
# full OMGSR-S step compiles in minutes; set TRAIN_XLA_FLAGS= to compile with XLA's defaults.
set -u
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
TRAIN_XLA_FLAGS=${TRAIN_XLA_FLAGS-"--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=1"}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
python3 -c "import jax, flax, optax, torch, diffusers, transformers; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, jax.devices())"

stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0)) s"
  grep -v "^WARNING\|^I0000\|^E0000\|^W0000" "$OUT/$name.log" | tail -n 25
}

STAGES=${STAGES:-tudsr mmdit train}
for s in $STAGES; do
  case $s in
    models) stage models ${MODELS_LIMIT:-150} python3 benchmarks/models_vs_torch.py --device gpu --dtype bfloat16 \
      --batch 8 --repeats 10 ${UNET_ONLY:+--only unet} --out "$OUT/models_gpu.json" ;;
    inference) stage inference ${INFERENCE_LIMIT:-120} python3 benchmarks/inference.py --device gpu --dtype bfloat16 \
      --batches ${INFER_BATCHES:-1,8} --repeats 10 --torch-device cuda --out "$OUT/inference_gpu.json" ;;
    tudsr) stage tudsr ${TUDSR_LIMIT:-240} python3 benchmarks/tudsr.py infer --device gpu --dtype bfloat16 \
      --repeats 5 --no_torch --no_merged --out "$OUT/tudsr_infer_gpu.json" ;;
    mmdit) stage mmdit ${MMDIT_LIMIT:-180} python3 benchmarks/mmdit.py --device gpu --only gpu_forward \
      --batch ${MMDIT_BATCH:-8} --repeats 5 --out "$OUT/mmdit_gpu.json" ;;
    train) XLA_FLAGS="${XLA_FLAGS:-} $TRAIN_XLA_FLAGS" stage train ${TRAIN_LIMIT:-300} python3 benchmarks/train_step.py --batch ${TRAIN_BATCH:-4} \
      --dtype bfloat16 --steps 5 --out "$OUT/train_step_gpu.json" ;;
  esac
done
