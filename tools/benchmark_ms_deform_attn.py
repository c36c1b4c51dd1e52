#!/usr/bin/env python
"""Benchmark multi-scale deformable attention: the compiled CPU kernel variants (baseline, AVX2,
AVX-512), float32 and bfloat16, side by side with the grid_sample reference.

Cases (800x1333 image, 4 levels 100x167, 50x84, 25x42, 13x21, S = 22223 tokens, 8 heads x 32
channels, 4 points, batch 1):
  encoder: Lq = S, reference point = each token's pixel centre, offsets ~ N(0, 2 px) per level;
  decoder: Lq = 300 random reference points, same value and offsets.
Attention weights are a softmax of N(0, 1) logits over L*P.

dtypes: float32 (everything float32) and bfloat16 (the autocast layout: bfloat16 value and
output, float32 locations and weights).  Kernels: every CPU variant this machine supports
(forced with _C.set_cpu_kernel_isa), "cuda" on a GPU, and "grid_sample" (backend="pytorch").

Time: median wall-clock over --repeats rounds (after one warm-up) of forward (no autograd) and of
forward + backward (grads w.r.t. value, locations and weights).  Within a round every variant
runs once, in turn, so load from other processes on a shared machine hits all of them alike.
Peak memory (unless --no-memory): the first compiled variant and grid_sample run once more each
in a fresh subprocess.  On CPU that subprocess resets its peak-RSS counter after building the inputs (Linux
/proc/self/clear_refs) and reports VmHWM minus VmRSS, the extra resident memory the call needed
at its peak (includes outputs and gradients).  On CUDA: torch.cuda.max_memory_allocated() minus
the allocation before the call.

    python tools/benchmark_ms_deform_attn.py [--device cpu|cuda] [--dtypes float32,bfloat16]
        [--kernels baseline,avx2,avx512,grid_sample] [--repeats 5] [--no-memory] [--json]
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from panoptic_segformer.layers import compiled_available, ms_deform_attn
from panoptic_segformer.layers.ms_deform_attn import _C

LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
HEADS, CHANNELS, POINTS = 8, 32, 4
CASES = {"encoder": None, "decoder": 300}
CPU_ISAS = ("baseline", "avx2", "avx512")


def make_inputs(case, device, dtype, seed=0):
    """Returns value (1,S,M,D), spatial_shapes, level_start_index, locations, weights.

    For a float16/bfloat16 dtype the value is in that dtype and locations/weights stay float32
    (the layout under autocast)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cumsum(areas, 0) - areas
    s, n_levels = int(areas.sum()), len(LEVELS)
    value = torch.randn(1, s, HEADS, CHANNELS, generator=g)
    if CASES[case] is None:  # encoder: one query per token, at its pixel centre
        refs = []
        for h, w in LEVELS:
            ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            refs.append(torch.stack([xs, ys], -1).reshape(-1, 2))
        ref = torch.cat(refs)
    else:
        ref = torch.rand(CASES[case], 2, generator=g)
    lq = ref.shape[0]
    wh = shapes.flip(-1).double()
    offsets = 2.0 * torch.randn(1, lq, HEADS, n_levels, POINTS, 2, generator=g, dtype=torch.float64)
    locs = ref.double().view(1, lq, 1, 1, 1, 2) + offsets / wh.view(1, 1, 1, n_levels, 1, 2)
    weights = torch.randn(1, lq, HEADS, n_levels * POINTS, generator=g).softmax(-1)
    weights = weights.view(1, lq, HEADS, n_levels, POINTS)
    loc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    loc = dict(device=device, dtype=loc_dtype)
    return value.to(device=device, dtype=dtype), shapes.to(device), starts.to(device), locs.to(**loc), weights.to(**loc)


@contextlib.contextmanager
def kernel(name):
    """Selects a CPU kernel variant for the duration (others: no-op)."""
    if name not in CPU_ISAS:
        yield
        return
    _C.set_cpu_kernel_isa(name)
    try:
        yield
    finally:
        _C.set_cpu_kernel_isa("auto")


def available_kernels(device):
    if device == "cuda":
        return ["cuda"]
    found = []
    for isa in CPU_ISAS:
        try:
            _C.set_cpu_kernel_isa(isa)
        except RuntimeError:  # not supported by this CPU or build
            continue
        found.append(isa)
    _C.set_cpu_kernel_isa("auto")
    return found


def run_once(inputs, backend, mode):
    value, shapes, starts, locs, weights = inputs
    if mode == "fwd":
        with torch.no_grad():
            return ms_deform_attn(value, shapes, starts, locs, weights, backend=backend)
    value, locs, weights = (t.detach().requires_grad_(True) for t in (value, locs, weights))
    out = ms_deform_attn(value, shapes, starts, locs, weights, backend=backend)
    out.backward(torch.ones_like(out))
    return out


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_variants(variants, repeats, device):
    """variants: {key: (inputs, kernel name, mode)} -> {key: median ms}, interleaved rounds."""
    times = {key: [] for key in variants}
    for _ in range(repeats + 1):  # round 0 is the warm-up
        for key, (inputs, kern, mode) in variants.items():
            backend = "pytorch" if kern == "grid_sample" else "compiled"
            with kernel(kern):
                _sync(device)
                t0 = time.perf_counter()
                run_once(inputs, backend, mode)
                _sync(device)
                times[key].append(time.perf_counter() - t0)
    return {key: 1e3 * statistics.median(t[1:]) for key, t in times.items()}


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_here(case, backend, mode, device, dtype):
    """Extra peak memory (MiB) of one call, measured in this (fresh) process."""
    inputs = make_inputs(case, device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_once(inputs, backend, mode)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    run_once(inputs, backend, mode)
    return (_status_kib("VmHWM") - base) / 1024


def memory_case(case, backend, mode, device, dtype_name):
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory", f"{case},{backend},{mode}",
           "--device", device, "--dtypes", dtype_name]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {res.stderr[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, float64, float16, bfloat16")
    ap.add_argument("--kernels", default=None,
                    help="comma list of baseline, avx2, avx512 (CPU) and grid_sample; default: all available")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default="encoder,decoder")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--_memory", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    if args._memory:
        case, backend, mode = args._memory.split(",")
        print(measure_memory_here(case, backend, mode, args.device, getattr(torch, dtypes[0])))
        return
    if not compiled_available(args.device):
        sys.exit(f"the compiled op is not available for {args.device}; build it with pip install -e .")
    kernels = args.kernels.split(",") if args.kernels else available_kernels(args.device) + ["grid_sample"]
    unknown = set(kernels) - set(available_kernels(args.device)) - {"grid_sample"}
    if unknown:
        sys.exit(f"kernels {sorted(unknown)} are not available here (available: {available_kernels(args.device)})")

    rows = []
    for case in args.cases.split(","):
        for dtype_name in dtypes:
            inputs = make_inputs(case, args.device, getattr(torch, dtype_name))
            variants = {(k, m): (inputs, k, m) for k in kernels for m in ("fwd", "fwdbwd")}
            ms = time_variants(variants, args.repeats, args.device)
            for k in kernels:
                row = {"case": case, "lq": int(inputs[3].shape[1]), "dtype": dtype_name, "kernel": k,
                       "fwd_ms": ms[(k, "fwd")], "fwdbwd_ms": ms[(k, "fwdbwd")]}
                if not args.no_memory and k in (kernels[0], "grid_sample"):
                    backend = "pytorch" if k == "grid_sample" else "compiled"
                    for m in ("fwd", "fwdbwd"):
                        row[f"{m}_peak_mib"] = memory_case(case, backend, m, args.device, dtype_name)
                rows.append(row)
            del inputs
    report = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "cpu_kernel_default": _C.cpu_kernel_isa() if args.device == "cpu" else None,
        "bfloat16_layout": "bfloat16 value/output, float32 locations and weights",
        "memory_method": "extra peak RSS (VmHWM reset after building inputs) of a fresh subprocess per case"
        if args.device == "cpu"
        else "torch.cuda.max_memory_allocated minus allocation before the call",
        "results": rows,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"device={args.device} threads={report['threads']} repeats={args.repeats} default CPU kernel="
          f"{report['cpu_kernel_default']} (median wall ms; bfloat16 = {report['bfloat16_layout']})")
    head = f"{'case':8} {'Lq':>6} {'dtype':9} {'kernel':12} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd MiB':>9} {'fwd+bwd MiB':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mem = f"{r['fwd_peak_mib']:9.1f} {r['fwdbwd_peak_mib']:12.1f}" if "fwd_peak_mib" in r else f"{'-':>9} {'-':>12}"
        print(f"{r['case']:8} {r['lq']:6d} {r['dtype']:9} {r['kernel']:12} {r['fwd_ms']:9.1f} {r['fwdbwd_ms']:11.1f} {mem}")


if __name__ == "__main__":
    main()
