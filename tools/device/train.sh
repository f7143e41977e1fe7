#!/usr/bin/env bash
# On a lent GPU machine (device tool), after tools/device/prepare.py here:
#   run(command="bash tools/device/train.sh 8", carry=[".device"], timeout_s=600)
# Trains the bundled model further for MINUTES of step time on CUDA (bf16 autocast), from the
# shipped weights, with part 8's recipe (MODEL_CARD.md) and more images per step, and returns
# best.safetensors, last.safetensors and log.jsonl in $OUT. Evaluate and ship here, on the CPU:
#   segany eval ../shared/data/{coco_mval,...} --split val --limit 10 --max-objects 2 --checkpoint best.safetensors
set -euo pipefail
minutes=${1:-8}
out=${OUT:-/tmp/device-out}
py=${PYTHON:-python3}  # the device image's python3 holds CUDA PyTorch
mkdir -p "$out" /tmp/segany-deps
$py -c "import pycocotools" 2>/dev/null || $py -m pip install -q --no-index --no-deps --target /tmp/segany-deps .device/wheels/*.whl
export PYTHONPATH="$PWD:/tmp/segany-deps" PYTHONUNBUFFERED=1
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
d=.device/data
$py -m segany train --data $d/coco_mval:0.3 --data $d/coco128:0.2 --data $d/clothing:0.2 --data $d/feral_cats:0.1 \
  --data $d/horses:0.1 --data $d/people:0.1 --init segany/weights/tiny.safetensors --out "${RUN_DIR:-/tmp/run}" \
  --steps 1000000 --time-budget-min "$minutes" --amp --images-per-step 8 --batch-images --mask-drop 0.5 --p-center-click 0.7 \
  --objects 8 --iters 11 --grad-iters 4 --lr 2.4e-4 --warmup 50 --focal-weight 2 --focal-alpha 0.5 --focal-gamma 0 \
  --min-object-area 200 --freeze-backbone-blocks 2 --val-every 500 --val-images 40 --seed 9 --no-progress \
  2>&1 | tee "$out/train.log" | grep -v '"step"' || true
cp "${RUN_DIR:-/tmp/run}"/{best.safetensors,last.safetensors,log.jsonl} "$out"/ 2>/dev/null || true
ls -la "$out"
