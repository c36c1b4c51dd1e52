#!/usr/bin/env python
"""CPU latency of every export format against eager PyTorch, side by side in one run.

    python tools/benchmark_export.py --config-file configs/quickstart.yaml --height 128 --width 192
    python tools/benchmark_export.py --config-file configs/R50.yaml --height 800 --width 1344 \
        --formats torch_export onnx --iters 3

Builds the model of the config (``MODEL.WEIGHTS`` or the seeded random init), exports it in
each ``--formats`` into ``--export-dir`` (a temporary folder by default; an existing export of
that folder is reused with ``--reuse``), then runs eager and every export on the same random
(height, width) image, round-robin for ``--iters`` timed runs after one warm-up run each, so that
a shared machine's load changes affect them alike. Reported per image (median): the network
(normalised padded batch to candidates) and the whole call (normalisation, network, merging),
with ratios to eager. Export (compile) times are printed too.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

if importlib.util.find_spec("panoptic_segformer") is None:  # run from a checkout, not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from panoptic_segformer import data  # noqa: E402,F401
from panoptic_segformer.config import get_panoptic_segformer_cfg  # noqa: E402
from panoptic_segformer.export import FORMATS, ExportableNetwork, ExportedModel, export_model  # noqa: E402
from panoptic_segformer.export.exporter import META_FILE  # noqa: E402
from panoptic_segformer.export.runtime import normalise_and_pad  # noqa: E402
from panoptic_segformer.predictor import load_weights  # noqa: E402


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--height", type=int, default=128, help="network input height")
    parser.add_argument("--width", type=int, default=192, help="network input width")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10, help="timed runs per variant")
    parser.add_argument("--export-dir", help="where to write the exports (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="reuse exports already in --export-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER)
    return parser


class _Eager:
    """The eager model with the same two entry points as ExportedModel."""

    def __init__(self, model):
        self.model, self.net = model, ExportableNetwork(model)

    def __call__(self, inputs):
        return self.model(inputs)

    def network(self, images, sizes):
        return self.net(images, sizes)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = get_panoptic_segformer_cfg(args.config_file, args.opts, "cpu")
    model = build_model(cfg).eval()
    load_weights(model, cfg.MODEL.WEIGHTS)
    root = args.export_dir or tempfile.mkdtemp(prefix="psf_export_")
    variants = {"eager": _Eager(model)}
    for fmt in args.formats:
        folder = os.path.join(root, fmt)
        if not (args.reuse and os.path.isfile(os.path.join(folder, META_FILE))):
            start = time.perf_counter()
            export_model(model, fmt, folder, input_format=cfg.INPUT.FORMAT,
                         min_size_test=cfg.INPUT.MIN_SIZE_TEST, max_size_test=cfg.INPUT.MAX_SIZE_TEST)
            print(f"export {fmt}: {time.perf_counter() - start:.1f} s", flush=True)
        variants[fmt] = ExportedModel(folder)

    gen = torch.Generator().manual_seed(args.seed)
    image = torch.randint(0, 256, (3, args.height, args.width), dtype=torch.uint8, generator=gen)
    inputs = [{"image": image} for _ in range(args.batch_size)]
    batch, sizes = normalise_and_pad([image] * args.batch_size, model.pixel_mean, model._pixel_inv_std,
                                     model.size_divisibility)
    h, w = batch.shape[-2:]

    times = {name: {"network": [], "call": []} for name in variants}
    with torch.no_grad():
        for round_ in range(args.iters + 1):
            for name, v in variants.items():
                start = time.perf_counter()
                v.network(batch, sizes)
                mid = time.perf_counter()
                v(inputs)
                end = time.perf_counter()
                if round_:  # round 0 warms up
                    times[name]["network"].append((mid - start) / args.batch_size * 1e3)
                    times[name]["call"].append((end - mid) / args.batch_size * 1e3)
    base = {k: statistics.median(times["eager"][k]) for k in ("network", "call")}
    print(f"\n{args.config_file}, input {args.height}x{args.width} (padded {h}x{w}), batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.iters}, ms per image")
    print(f"{'variant':<14}{'network':>10}{'ratio':>8}{'whole call':>12}{'ratio':>8}")
    for name, t in times.items():
        net, call = statistics.median(t["network"]), statistics.median(t["call"])
        print(f"{name:<14}{net:>10.1f}{net / base['network']:>8.2f}{call:>12.1f}{call / base['call']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
