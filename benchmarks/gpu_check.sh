#!/usr/bin/env bash
# The GPU checks of the multi-host/GPU issue as one script for a lent GPU machine (see
# /work/.library/device: no network there, its own python3 with a CUDA jax, so nothing is installed):
#   1. the tiny end-to-end recipe (the three demo stages, shortened) on the GPU, then held-out VQA;
#   2. the ~1.2B train-step benchmark: step time and MFU (bf16), remat policies, XLA vs cuDNN attention.
# Everything it prints goes to $OUT (the device tool brings that folder back). Budget: ~8 minutes.
#
#     bash benchmarks/gpu_check.sh            (on the GPU machine, from the repository root)
set -uo pipefail
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
unset JAX_PLATFORMS
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee "$OUT/devices.txt"

python3 -m data_pipelines.synthetic --out demo_world --train-pictures 2000 --samples-per-shard 500 > /dev/null
for stage in lm stage1 stage2; do
  timeout 150 python3 -m owl_jax.train --config "configs/demo_$stage.yaml" training.steps=100 \
      training.eval_every=0 training.log_every=20 "training.output_dir=runs/gpu/$stage" \
      $( [ "$stage" != lm ] && echo "init.from_checkpoint=runs/gpu/$([ "$stage" = stage1 ] && echo lm || echo stage1)" ) \
      "data.train_paths=['demo_world/captions/train-{000000..000003}.tar']" 2>&1 | tee "$OUT/e2e_$stage.log" | grep -E "^(step|done|mesh|error)"
done
timeout 60 python3 -m owl_jax.evaluate --checkpoint runs/gpu/stage2 --task vqa --questions demo_world/eval_vqa.jsonl \
    --image-root demo_world/images --limit 200 2>&1 | tee "$OUT/e2e_eval.log" | tail -3

timeout 300 python3 benchmarks/train_step.py --sizes 1b --parts remat,attention --steps 6 --warmup 2 2>&1 \
    | tee "$OUT/train_step_1b.log" | grep -E "^\||parameters"
