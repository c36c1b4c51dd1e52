#!/usr/bin/env python
"""Inference latency and peak memory of any config at a given resolution, with a stage breakdown.

    python tools/benchmark_inference.py --config-file configs/R50.yaml --height 800 --width 1333 \
        --device cpu --iters 5 [--json] [--opts KEY VALUE ...]

The model runs in eval mode on a fixed random image of exactly (height, width) (or ``--image``
resized to it), so the network input is that size. Reported per image (batch latency / batch
size), median over ``--iters`` timed runs after ``--warmup`` untimed ones:

- the stages of ``PanopticSegFormer``, timed from outside by wrapping its stage methods:
  preprocess (normalisation), backbone, neck+encoder, location decoder, mask decoders
  (thing + stuff), merging (resizing of the kept masks + mask-wise merging), and "other"
  (the rest: top-k candidates, padding, output assembly); a model without these methods
  gets the total only;
- peak memory over the warm-up and timed runs: on GPU, ``torch.cuda.max_memory_allocated``; on
  CPU (Linux), the peak of the bytes in use by malloc (glibc; else the resident set size),
  sampled every 2 ms, and its rise over the loaded model, plus the peak resident set size;
- the process CPU time per image (all threads), to tell a busy machine (wall >> CPU / threads).

With ``MODEL.WEIGHTS`` empty the model has random weights: every stage but merging costs the
same as with trained weights; merging depends on how many segments pass the thresholds.
"""

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections import defaultdict

import numpy as np
import torch

if importlib.util.find_spec("panoptic_segformer") is None:  # run from a checkout, not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import panoptic_segformer.data  # noqa: E402,F401  (registers the project's datasets)
from panoptic_segformer.config import get_panoptic_segformer_cfg  # noqa: E402
from panoptic_segformer.predictor import load_weights  # noqa: E402

# (label, method of the meta-architecture), in execution order
STAGES = [
    ("preprocess", "preprocess_image"),
    ("backbone", "_backbone_features"),
    ("neck+encoder", "_encode"),
    ("location decoder", "_locate"),
    ("mask decoders", "_decode_masks"),
    ("merging", "_merge"),
]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--height", type=int, default=800, help="network input height")
    parser.add_argument("--width", type=int, default=1333, help="network input width")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument(
        "--device", default=None, help="cpu or cuda[:i] (default: the config's MODEL.DEVICE)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--iters", type=int, default=5, help="timed runs")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument(
        "--image", help="an image file resized to (height, width) instead of random pixels"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ..."
    )
    return parser


def make_inputs(args, input_format):
    """``batch_size`` input dicts with a uint8 (3, height, width) image in the model's channel order."""
    if args.image:
        import cv2

        image = cv2.resize(read_image(args.image, format=input_format), (args.width, args.height))
    else:
        image = np.random.default_rng(0).integers(
            0, 256, (args.height, args.width, 3), dtype=np.uint8
        )
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return [
        {"image": tensor, "height": args.height, "width": args.width}
        for _ in range(args.batch_size)
    ]


class StageTimer:
    """Wraps stage methods of a model instance and accumulates their wall time per run."""

    def __init__(self, model, stages, sync):
        self.sync = sync
        self.current = defaultdict(float)
        self.found = []
        for label, name in stages:
            method = getattr(model, name, None)
            if callable(method):
                setattr(model, name, self._wrap(label, method))
                self.found.append(label)

    def _wrap(self, label, method):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = method(*args, **kwargs)
            self.sync()
            self.current[label] += time.perf_counter() - start
            return out

        return timed

    def pop(self):
        run, self.current = dict(self.current), defaultdict(float)
        return run


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _mallinfo2():
    """glibc's mallinfo2 (glibc >= 2.33), or None."""
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


class MemorySampler:
    """Peak memory of this process while running, sampled every ``interval`` s by a thread.

    Two measures: the resident set size (/proc/self/statm), and, with glibc, the bytes in use
    by malloc (where PyTorch's CPU tensors live). RSS misses memory that the allocator reuses
    from earlier frees; the malloc count does not.
    """

    def __init__(self, interval=0.002):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.mallinfo = _mallinfo2()
        self._stop = threading.Event()

    @staticmethod
    def available():
        return os.path.exists("/proc/self/statm")

    def sample(self):
        """(RSS bytes, malloc bytes in use or 0)."""
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * self.page
        if self.mallinfo is None:
            return rss, 0
        info = self.mallinfo()
        return rss, info.uordblks + info.hblkhd

    def _update(self):
        rss, used = self.sample()
        self.peak_rss, self.peak_used = max(self.peak_rss, rss), max(self.peak_used, used)

    def _run(self):
        while not self._stop.is_set():
            self._update()
            time.sleep(self.interval)

    def __enter__(self):
        self.base_rss, self.base_used = self.sample()
        self.peak_rss, self.peak_used = self.base_rss, self.base_used
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._update()


def benchmark(model, inputs, *, warmup, iters, device):
    """Run the model; return per-image medians (ms) of the total and of each stage, and memory."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = StageTimer(model, STAGES, sync)
    n = len(inputs)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sampler = MemorySampler() if not cuda and MemorySampler.available() else None
    totals, cpu_times, runs = [], [], []  # per timed run: wall s, process CPU s, {stage: wall s}
    with torch.no_grad(), sampler or contextlib.nullcontext():
        for _ in range(warmup):
            model(inputs)
        timer.pop()
        for _ in range(iters):
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            model(inputs)
            sync()
            totals.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            runs.append(timer.pop())

    def per_image_ms(values):
        return 1000 * statistics.median(values) / n

    result = {"total_ms": per_image_ms(totals), "cpu_ms": per_image_ms(cpu_times), "stages_ms": {}}
    for label in timer.found:
        result["stages_ms"][label] = per_image_ms([run.get(label, 0.0) for run in runs])
    if timer.found:
        result["stages_ms"]["other"] = per_image_ms(
            [t - sum(run.values()) for t, run in zip(totals, runs)]
        )
    if cuda:
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["memory_kind"] = "torch.cuda.max_memory_allocated"
    elif sampler and sampler.mallinfo is not None:
        result["peak_memory_mib"] = sampler.peak_used / 2**20
        result["memory_increase_mib"] = (sampler.peak_used - sampler.base_used) / 2**20
        result["peak_rss_mib"] = sampler.peak_rss / 2**20
        result["memory_kind"] = "peak bytes in use by malloc, sampled every 2 ms"
    elif sampler:
        result["peak_memory_mib"] = sampler.peak_rss / 2**20
        result["memory_increase_mib"] = (sampler.peak_rss - sampler.base_rss) / 2**20
        result["memory_kind"] = "peak RSS, sampled every 2 ms"
    else:  # no /proc: the process-lifetime peak (kilobytes on Linux, bytes on macOS)
        scale = 1 if platform.system() == "Darwin" else 1024
        result["peak_memory_mib"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        )
        result["memory_kind"] = "process-lifetime max RSS"
    return result


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(info, result) -> str:
    lines = [
        f"config: {info['config']}  device: {info['device']}  threads: {info['threads']}",
        f"input: {info['batch_size']} x 3 x {info['height']} x {info['width']}  "
        f"runs: {info['iters']} timed after {info['warmup']} warm-up  weights: {info['weights']}",
        f"{'stage':<20}{'ms / image':>12}{'share':>8}",
    ]
    total = result["total_ms"]
    for label, ms in result["stages_ms"].items():
        lines.append(f"{label:<20}{ms:>12.1f}{100 * ms / total:>7.1f}%")
    lines.append(f"{'total (median)':<20}{total:>12.1f}")
    lines.append(
        f"{'process CPU time':<20}{result['cpu_ms']:>12.1f}   (all threads; wall >> CPU / threads means a busy machine)"
    )
    memory = f"peak memory: {result['peak_memory_mib']:.0f} MiB ({result['memory_kind']}"
    if "memory_increase_mib" in result:
        memory += f"; +{result['memory_increase_mib']:.0f} MiB over the loaded model"
    if "peak_rss_mib" in result:
        memory += f"; peak RSS {result['peak_rss_mib']:.0f} MiB"
    lines.append(memory + ")")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    for name, value in (
        ("height", args.height),
        ("width", args.width),
        ("batch-size", args.batch_size),
        ("iters", args.iters),
    ):
        if value < 1:
            print(f"--{name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.warmup < 0:
        print(f"--warmup must be >= 0, got {args.warmup}", file=sys.stderr)
        return 2
    setup_logger(name="panoptic_segformer")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_panoptic_segformer_cfg(args.config_file, args.opts, args.device)
    cfg.freeze()
    torch.manual_seed(args.seed)  # random weights decide how many segments reach the merging
    model = build_model(cfg)
    model.eval()
    load_weights(model, cfg.MODEL.WEIGHTS)
    device = torch.device(cfg.MODEL.DEVICE)
    inputs = make_inputs(args, cfg.INPUT.FORMAT)
    result = benchmark(model, inputs, warmup=args.warmup, iters=args.iters, device=device)
    info = {
        "config": args.config_file,
        "opts": args.opts,
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})"
        ),
        "threads": torch.get_num_threads(),
        "height": args.height,
        "width": args.width,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "iters": args.iters,
        "weights": cfg.MODEL.WEIGHTS or "random",
        "torch": torch.__version__,
    }
    print(json.dumps({**info, **result}) if args.json else format_table(info, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
