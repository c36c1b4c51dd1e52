#!/usr/bin/env bash
# The README quickstart: train the small model on the generated toy dataset, evaluate PQ, draw
# a few val images. Run through `make quickstart`, which sets up the environment first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python train_net.py --config-file configs/quickstart.yaml
python demo/demo.py --config-file configs/quickstart.yaml \
    --input ~/.cache/panoptic_segformer/toy/v1/val/images/00000[1-4].png --output output/quickstart/vis \
    --opts MODEL.WEIGHTS output/quickstart/model_final.pth
echo "== learning curve (PQ, PQ_th, PQ_st against iterations): output/quickstart/vis/learning_curve.png"
echo "== demo drawings: output/quickstart/vis/"
