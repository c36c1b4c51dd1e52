#!/usr/bin/env python
"""Inference latency, peak memory and achieved FLOP rate of every inference variant of a config,
side by side in one run, with a stage breakdown.

    python tools/benchmark_inference.py --config-file configs/R50.yaml --height 800 --width 1333 \
        --device cpu [--precision fp32 bf16] [--compile both] [--channels-last off] \
        [--iters 3] [--json] [--opts KEY VALUE ...]
    python tools/benchmark_inference.py --config-file configs/R50.yaml --variants fp32 bf16+cl bf16+cl+compile

Variants are every combination of ``--precision`` (default: fp32 and each 16-bit type the device
runs natively), ``--compile`` (off / on / both, default both) and ``--channels-last`` (backbone
weights channels-last; default off), e.g. "fp32", "bf16+cl", "bf16+compile"; or the names given
to ``--variants``. Each variant is a copy of one model (same weights, ``MODEL.WEIGHTS`` or the seeded random init) set up by
:func:`panoptic_segformer.predictor.prepare_for_inference`. They run on a fixed random image of
exactly (height, width) (or ``--image`` resized to it), so the network input is that size.

First every variant runs ``--warmup`` untimed times (the first call of a compiled variant
compiles; its time is reported). Then the timed runs go round-robin over the variants, so a
shared machine's load changes affect them alike. Reported per image (batch latency / batch
size), median over ``--iters`` timed runs:

- the stages of ``PanopticSegFormer``, timed from outside by wrapping its stage methods:
  preprocess (normalisation), backbone, neck+encoder, location decoder, mask decoders
  (thing + stuff), merging (resizing of the kept masks + mask-wise merging), and "other"
  (the rest: top-k candidates, padding, output assembly); a model without these methods
  gets the total only;
- the working memory of a run: on GPU, ``torch.cuda.max_memory_allocated`` over the run minus
  the allocation at its start; on CPU (Linux), the peak minus the lowest level of the bytes in
  use by malloc (glibc; else the resident set size) during the run, sampled every 2 ms; and
  the process's peak resident set size (all variants' models are loaded together);
- the process CPU time per image (all threads), to tell a busy machine (wall >> CPU / threads);
- the achieved rate: the model's fvcore FLOP count (multiply-adds, as
  ``tools/analyze_model.py`` counts them; 249.9 G for R50 at 800x1333) over the latency, next to
  the machine's measured matmul rate (2048^3 ``torch.mm``, in the same multiply-add units) in
  fp32 and each variant's dtype.

With ``MODEL.WEIGHTS`` empty the model has random weights: every stage but merging costs the
same as with trained weights; merging depends on how many segments pass the thresholds.
"""

import argparse
import contextlib
import copy
import ctypes
import importlib.util
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

if importlib.util.find_spec("panoptic_segformer") is None:  # run from a checkout, not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import panoptic_segformer.data  # noqa: E402,F401  (registers the project's datasets)
from panoptic_segformer.config import get_panoptic_segformer_cfg  # noqa: E402
from panoptic_segformer.modeling.precision import (  # noqa: E402
    PRECISIONS,
    native_cpu_support,
    precision_dtype,
)
from panoptic_segformer.predictor import load_weights, prepare_for_inference  # noqa: E402

# (label, method of the meta-architecture), in execution order
STAGES = [
    ("preprocess", "preprocess_image"),
    ("backbone", "_backbone_features"),
    ("neck+encoder", "_encode"),
    ("location decoder", "_locate"),
    ("mask decoders", "_decode_masks"),
    ("merging", "_merge"),
]
_SWITCH = {"off": [False], "on": [True], "both": [False, True]}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--height", type=int, default=800, help="network input height")
    parser.add_argument("--width", type=int, default=1333, help="network input width")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument(
        "--device", default=None, help="cpu or cuda[:i] (default: the config's MODEL.DEVICE)"
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        help="precisions to compare (default: fp32 and the 16-bit types the device runs natively)",
    )
    parser.add_argument(
        "--compile", choices=sorted(_SWITCH), default="both", help="torch.compile variants"
    )
    parser.add_argument(
        "--channels-last",
        choices=sorted(_SWITCH),
        default="off",
        help="variants with the backbone weights channels-last",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help="explicit variants PRECISION[+cl][+compile] instead of the combinations above",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs first (>= 1 with compiled variants)"
    )
    parser.add_argument("--iters", type=int, default=3, help="timed runs per variant")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument(
        "--image", help="an image file resized to (height, width) instead of random pixels"
    )
    flops = parser.add_mutually_exclusive_group()
    flops.add_argument(
        "--gflops",
        type=float,
        help="the model's GFLOPs (multiply-adds) per image at this size, instead of counting "
        "them with fvcore",
    )
    flops.add_argument(
        "--no-flops", action="store_true", help="skip the FLOP count and the matmul rates"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ..."
    )
    return parser


def default_precisions(device: torch.device) -> List[str]:
    """fp32 plus the 16-bit types that ``device`` runs natively."""
    if device.type == "cuda":
        return ["fp32"] + (["bf16"] if torch.cuda.is_bf16_supported() else []) + ["fp16"]
    return ["fp32"] + [p for p in ("bf16", "fp16") if native_cpu_support(precision_dtype(p))]


def variant_name(precision: str, channels_last: bool, compiled: bool) -> str:
    return precision + ("+cl" if channels_last else "") + ("+compile" if compiled else "")


def parse_variant(name: str):
    """"bf16+cl+compile" -> ("bf16", True, True); ValueError for anything else."""
    precision, *flags = name.split("+")
    if precision not in PRECISIONS or len(set(flags)) != len(flags) or set(flags) - {"cl", "compile"}:
        raise ValueError(f"variant {name!r} is not PRECISION[+cl][+compile] with PRECISION in {list(PRECISIONS)}")
    return precision, "cl" in flags, "compile" in flags


def variant_list(precisions, channels_last: str, compile: str) -> List[str]:
    """Every combination of ``precisions`` x ``channels_last`` x ``compile`` ("off", "on", "both")."""
    return [
        variant_name(p, cl, c)
        for p, cl, c in itertools.product(precisions, _SWITCH[channels_last], _SWITCH[compile])
    ]


def variant_models(base, names: Sequence[str]) -> Dict[str, torch.nn.Module]:
    """{name: a deep copy of ``base`` set up by ``prepare_for_inference``} for each variant name."""
    models = {}
    for name in names:
        precision, cl, compiled = parse_variant(name)
        model = copy.deepcopy(base)
        precision_arg = precision if hasattr(model, "precision") else None
        prepare_for_inference(model, precision=precision_arg, compile=compiled, channels_last=cl)
        models[variant_name(precision, cl, compiled)] = model
    return models


def fallbacks(model) -> List[str]:
    """Names of the compiled stages of ``model`` that fell back to eager."""
    return [n for n, m in model.named_modules() if getattr(m.forward, "failed", None) is not None]


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
    """Memory of this process while running, sampled every ``interval`` s by a thread.

    Two measures: the resident set size (/proc/self/statm), and, with glibc, the bytes in use
    by malloc (where PyTorch's CPU tensors live). RSS misses memory that the allocator reuses
    from earlier frees; the malloc count does not. Keeps the peak and the lowest level of each.
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
        self.low_rss, self.low_used = min(self.low_rss, rss), min(self.low_used, used)

    def _run(self):
        while not self._stop.is_set():
            self._update()
            time.sleep(self.interval)

    def __enter__(self):
        self.base_rss, self.base_used = self.sample()
        self.peak_rss, self.peak_used = self.base_rss, self.base_used
        self.low_rss, self.low_used = self.base_rss, self.base_used
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._update()

    def working_bytes(self) -> int:
        """Peak minus lowest level during the sampling: malloc bytes with glibc, else RSS."""
        if self.mallinfo is not None:
            return self.peak_used - self.low_used
        return self.peak_rss - self.low_rss


class _Run:
    """One variant under test: its model, stage timer and per-run records."""

    def __init__(self, model, device):
        self.model = model
        self.cuda = device.type == "cuda"
        self.device = device
        self.sync = (lambda: torch.cuda.synchronize(device)) if self.cuda else (lambda: None)
        self.timer = StageTimer(model, STAGES, self.sync)
        self.first_call_s = None
        self.totals, self.cpu_times, self.stages, self.memory = [], [], [], []

    def warm(self, inputs, times):
        for i in range(times):
            self.sync()
            start = time.perf_counter()
            self.model(inputs)
            self.sync()
            if i == 0:
                self.first_call_s = time.perf_counter() - start
        self.timer.pop()

    def timed(self, inputs):
        sampler = MemorySampler() if not self.cuda and MemorySampler.available() else None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            at_start = torch.cuda.memory_allocated(self.device)
        self.sync()
        with sampler or contextlib.nullcontext():
            start, cpu_start = time.perf_counter(), time.process_time()
            self.model(inputs)
            self.sync()
            self.totals.append(time.perf_counter() - start)
            self.cpu_times.append(time.process_time() - cpu_start)
        self.stages.append(self.timer.pop())
        if self.cuda:
            self.memory.append(torch.cuda.max_memory_allocated(self.device) - at_start)
        elif sampler:
            self.memory.append(sampler.working_bytes())

    def result(self, n_images) -> Dict:
        def per_image_ms(values):
            return 1000 * statistics.median(values) / n_images

        result = {
            "total_ms": per_image_ms(self.totals),
            "cpu_ms": per_image_ms(self.cpu_times),
            "stages_ms": {},
        }
        for label in self.timer.found:
            result["stages_ms"][label] = per_image_ms([run.get(label, 0.0) for run in self.stages])
        if self.timer.found:
            result["stages_ms"]["other"] = per_image_ms(
                [t - sum(run.values()) for t, run in zip(self.totals, self.stages)]
            )
        if self.first_call_s is not None:
            result["first_call_s"] = self.first_call_s
        if self.memory:
            result["working_memory_mib"] = max(self.memory) / 2**20
            result["memory_kind"] = (
                "torch.cuda.max_memory_allocated over the run minus at its start"
                if self.cuda
                else "peak minus lowest bytes in use by malloc during the run, sampled every 2 ms"
            )
        return result


def benchmark_variants(models: Dict, inputs, *, warmup, iters, device) -> Dict[str, Dict]:
    """Warm up every model, then time them round-robin; {name: per-image medians (ms) and memory}."""
    runs = {name: _Run(model, device) for name, model in models.items()}
    with torch.no_grad():
        for run in runs.values():
            run.warm(inputs, warmup)
        for _ in range(iters):
            for run in runs.values():
                run.timed(inputs)
    return {name: run.result(len(inputs)) for name, run in runs.items()}


def benchmark(model, inputs, *, warmup, iters, device) -> Dict:
    """One model: per-image medians (ms) of the total and of each stage, and memory."""
    return benchmark_variants({"model": model}, inputs, warmup=warmup, iters=iters, device=device)[
        "model"
    ]


def matmul_rate(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Median rate of an n x n x n ``torch.mm`` in G multiply-adds per second."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    times = []
    for i in range(repeats + 2):
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return n**3 / statistics.median(times) / 1e9


def count_gflops(args) -> float:
    """fvcore GFLOPs (multiply-adds) of one image at (height, width), as tools/analyze_model.py."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import analyze_model

    opts = list(args.opts) + [
        "MODEL.PANOPTIC_SEGFORMER.TEST.THING_SCORE_THRESH", "2.0",
        "MODEL.PANOPTIC_SEGFORMER.TEST.STUFF_SCORE_THRESH", "2.0",
    ]
    model = analyze_model.build(args.config_file, opts)
    return analyze_model.count_flops(model, args.height, args.width)[0]["total"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(info, results: Dict[str, Dict]) -> str:
    names = list(results)
    width = max(12, *(len(n) + 2 for n in names))
    lines = [
        f"config: {info['config']}  device: {info['device']}  threads: {info['threads']}  torch {info['torch']}",
        f"input: {info['batch_size']} x 3 x {info['height']} x {info['width']}  "
        f"runs: {info['iters']} timed (round-robin) after {info['warmup']} warm-up  weights: {info['weights']}",
        f"load average before / after: {info['load_before']} / {info['load_after']}",
        "ms / image (median)".ljust(22) + "".join(n.rjust(width) for n in names),
    ]
    stages = list(next(iter(results.values()))["stages_ms"])
    for label in stages:
        lines.append(
            f"  {label:<20}" + "".join(f"{r['stages_ms'][label]:>{width}.1f}" for r in results.values())
        )
    lines.append(f"{'total':<22}" + "".join(f"{r['total_ms']:>{width}.1f}" for r in results.values()))
    base = results[names[0]]["total_ms"]
    lines.append(
        f"{'time / ' + names[0]:<22}" + "".join(f"{r['total_ms'] / base:>{width}.2f}" for r in results.values())
    )
    lines.append(f"{'process CPU ms':<22}" + "".join(f"{r['cpu_ms']:>{width}.1f}" for r in results.values()))
    if any("first_call_s" in r for r in results.values()):
        lines.append(
            f"{'first call s':<22}"
            + "".join(f"{r.get('first_call_s', float('nan')):>{width}.1f}" for r in results.values())
        )
    if all("working_memory_mib" in r for r in results.values()):
        lines.append(
            f"{'working memory MiB':<22}"
            + "".join(f"{r['working_memory_mib']:>{width}.0f}" for r in results.values())
        )
    if "gflops" in info:
        lines.append(
            f"{'achieved GFLOP/s':<22}" + "".join(f"{r['gflop_per_s']:>{width}.1f}" for r in results.values())
        )
        lines.append(
            f"{'% of fp32 matmul':<22}"
            + "".join(f"{r['pct_fp32_matmul']:>{width}.0f}" for r in results.values())
        )
        lines.append(
            f"{'% of own-dtype mm':<22}"
            + "".join(f"{r['pct_dtype_matmul']:>{width}.0f}" for r in results.values())
        )
        rates = ", ".join(f"{k} {v:.1f}" for k, v in info["matmul_gflop_per_s"].items())
        lines.append(
            f"model: {info['gflops']:.1f} GFLOPs / image (fvcore multiply-adds); "
            f"matmul 2048^3: {rates} G multiply-adds/s"
        )
    if "working_memory_mib" in next(iter(results.values())):
        lines.append(
            f"working memory: {next(iter(results.values()))['memory_kind']}; "
            f"process peak RSS {info['peak_rss_mib']:.0f} MiB (all variants loaded)"
        )
    for name, r in results.items():
        if r.get("fallback"):
            lines.append(f"{name}: ran eagerly in {', '.join(r['fallback'])} (compilation failed)")
    return "\n".join(lines)


def _load() -> Optional[str]:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return None


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
    setup_logger(name="panoptic_segformer")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_panoptic_segformer_cfg(args.config_file, args.opts, args.device)
    cfg.freeze()
    device = torch.device(cfg.MODEL.DEVICE)
    names = args.variants or variant_list(
        args.precision or default_precisions(device), args.channels_last, args.compile
    )
    try:
        variants = [parse_variant(name) for name in names]
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    precisions = list(dict.fromkeys(p for p, _, _ in variants))
    if args.warmup < 0 or (args.warmup == 0 and any(c for _, _, c in variants)):
        print(f"--warmup must be >= 0, and >= 1 with compiled variants; got {args.warmup}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)  # random weights decide how many segments reach the merging
    base = build_model(cfg)
    base.eval()
    load_weights(base, cfg.MODEL.WEIGHTS)
    if not hasattr(base, "precision") and precisions != ["fp32"]:
        print(f"{type(base).__name__} has no precision setting: use --precision fp32", file=sys.stderr)
        return 2
    load_before = _load()
    models = variant_models(base, names)
    del base
    inputs = make_inputs(args, cfg.INPUT.FORMAT)
    results = benchmark_variants(models, inputs, warmup=args.warmup, iters=args.iters, device=device)
    for name, model in models.items():
        if fallbacks(model):
            results[name]["fallback"] = fallbacks(model)
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
        "load_before": load_before,
        "load_after": _load(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        * (1 if platform.system() == "Darwin" else 1024)
        / 2**20,
    }
    if not args.no_flops:
        info["gflops"] = args.gflops if args.gflops is not None else count_gflops(args)
        dtypes = [torch.float32] + sorted({precision_dtype(p) for p in precisions} - {torch.float32}, key=str)
        rates = {str(d).replace("torch.", ""): matmul_rate(d, device) for d in dtypes}
        info["matmul_gflop_per_s"] = rates
        for name, r in results.items():
            own = str(precision_dtype(name.split("+")[0])).replace("torch.", "")
            r["gflop_per_s"] = info["gflops"] / (r["total_ms"] / 1000)
            r["pct_fp32_matmul"] = 100 * r["gflop_per_s"] / rates["float32"]
            r["pct_dtype_matmul"] = 100 * r["gflop_per_s"] / rates[own]
    if args.json:
        print(json.dumps({**info, "variants": results}))
    else:
        print(format_table(info, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
