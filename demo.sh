#!/usr/bin/env bash
# The owl-jax demo, one command on a fresh machine: a virtual environment, the install, a synthetic
# "demo world" of coloured-shape pictures, the three training stages of a tiny mPLUG-Owl on the CPU
# (text pretraining -> stage 1 captions with the LLM frozen -> stage 2 LoRA instruction tuning), and
# held-out accuracy next to chance. Re-running resumes finished/interrupted stages from their checkpoints.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e .
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

python -m data_pipelines.synthetic --out demo_world --train-pictures 6000 --samples-per-shard 1000 > /dev/null
echo "demo world ready in demo_world/"
# Re-running resumes the stages in runs/demo/, but only checkpoints of these same recipes and world: after
# an update that changed them, the old runs are moved aside (never deleted) and the demo starts over.
recipe=$(cat configs/demo_*.yaml demo_world/manifest.json | sha256sum | cut -c1-16)
if [ -d runs/demo ] && [ "$(cat runs/demo/.recipe 2>/dev/null)" != "$recipe" ]; then
  old="runs/demo.before-$(date +%Y%m%d-%H%M%S)"
  while [ -e "$old" ]; do old="$old+"; done
  mv runs/demo "$old"
  echo "the demo recipes or world changed since runs/demo/ was trained: moved it to $old/"
fi
mkdir -p runs/demo && echo "$recipe" > runs/demo/.recipe
for stage in lm stage1 stage2; do
  echo "=== training: configs/demo_$stage.yaml"
  python -m owl_jax.train --config "configs/demo_$stage.yaml" logging.progress=true | grep -E "^(step|done|resumed|parameters|mesh|already complete|interrupted|preempted)"
done
echo "=== held-out pictures (never seen in training)"
echo "-- stage 1: pick each picture's caption among 5"
python -m owl_jax.evaluate --checkpoint runs/demo/stage1 --task captions --questions demo_world/eval_captions.jsonl \
  --image-root demo_world/images --limit 200
echo "-- stage 2: answer questions about the pictures (multiple choice)"
python -m owl_jax.evaluate --checkpoint runs/demo/stage2 --task vqa --questions demo_world/eval_vqa.jsonl \
  --image-root demo_world/images --limit 500
