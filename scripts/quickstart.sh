#!/usr/bin/env bash
# The README quickstart: pretrain the backbone on the toy's thing crops (a stand-in for ImageNet
# weights), train the small model, evaluate PQ, draw a few val images. Run through
# `make quickstart` (or `make quickstart STYLE=hard`), which sets up the environment first.
#   scripts/quickstart.sh [easy|hard]    easy: toy_panoptic_*  hard: toy_hard_panoptic_*
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
style=${1:-easy}
case "$style" in
    easy) prefix=toy_panoptic; folder=v1; out=output/quickstart ;;
    hard) prefix=toy_hard_panoptic; folder=hard-v1; out=output/quickstart_hard ;;
    *) echo "usage: $0 [easy|hard]" >&2; exit 2 ;;
esac
data=(DATASETS.TRAIN "('${prefix}_train',)" DATASETS.TEST "('${prefix}_val',)" OUTPUT_DIR "$out")
python tools/pretrain_backbone.py --config-file configs/quickstart.yaml \
    --output "$out/backbone_pretrained.pth" --steps 1500 --opts "${data[@]}"
python train_net.py --config-file configs/quickstart.yaml "${data[@]}" MODEL.WEIGHTS "$out/backbone_pretrained.pth"
python demo/demo.py --config-file configs/quickstart.yaml \
    --input "${PSF_TOY_ROOT:-$HOME/.cache/panoptic_segformer/toy}/$folder"/val/images/00000[1-4].png \
    --output "$out/vis" --opts "${data[@]}" MODEL.WEIGHTS "$out/model_final.pth"
echo "== learning curve (PQ, PQ_th, PQ_st against iterations): $out/vis/learning_curve.png"
echo "== demo drawings: $out/vis/"
