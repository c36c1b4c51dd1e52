#!/usr/bin/env python
"""Benchmark multi-scale deformable attention: compiled kernel vs the grid_sample reference.

Cases (800x1333 image, 4 levels 100x167, 50x84, 25x42, 13x21, S = 22223 tokens, 8 heads x 32
channels, 4 points, batch 1):
  encoder: Lq = S, reference point = each token's pixel centre, offsets ~ N(0, 2 px) per level;
  decoder: Lq = 300 random reference points, same value and offsets.
Attention weights are a softmax of N(0, 1) logits over L*P.

Time: median wall-clock over --repeats runs (after one warm-up) of forward (no autograd) and of
forward + backward (grads w.r.t. value, locations and weights).
Peak memory: each (case, backend, mode) runs once more in a fresh subprocess.  On CPU that
subprocess resets its peak-RSS counter after building the inputs (Linux /proc/self/clear_refs)
and reports VmHWM minus VmRSS, i.e. the extra resident memory the call needed at its peak
(includes the outputs and gradients; Linux only).  On CUDA it reports torch.cuda.max_memory_allocated() minus the allocation before
the call.

    python tools/benchmark_ms_deform_attn.py [--device cpu|cuda] [--dtype float32] [--repeats 5] [--json]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from panoptic_segformer.layers import compiled_available, ms_deform_attn

LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
HEADS, CHANNELS, POINTS = 8, 32, 4
CASES = {"encoder": None, "decoder": 300}


def make_inputs(case, device, dtype, seed=0):
    """Returns value (1,S,M,D), spatial_shapes, level_start_index, locations, weights."""
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
    cast = dict(device=device, dtype=dtype)
    return value.to(**cast), shapes.to(device), starts.to(device), locs.to(**cast), weights.to(**cast)


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


def time_case(inputs, backend, mode, repeats, device):
    run_once(inputs, backend, mode)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run_once(inputs, backend, mode)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


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
           "--device", device, "--dtype", dtype_name]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {res.stderr[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default="encoder,decoder")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--_memory", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args._memory:
        case, backend, mode = args._memory.split(",")
        print(measure_memory_here(case, backend, mode, args.device, dtype))
        return
    if not compiled_available(args.device):
        sys.exit(f"the compiled op is not available for {args.device}; build it with pip install -e .")

    rows = []
    for case in args.cases.split(","):
        inputs = make_inputs(case, args.device, dtype)
        for backend in ("compiled", "pytorch"):
            row = {"case": case, "lq": int(inputs[3].shape[1]), "backend": backend}
            for mode in ("fwd", "fwdbwd"):
                row[f"{mode}_ms"] = time_case(inputs, backend, mode, args.repeats, args.device)
                if not args.no_memory:
                    row[f"{mode}_peak_mib"] = memory_case(case, backend, mode, args.device, args.dtype)
            rows.append(row)
        del inputs
    speedups = {}
    for case in args.cases.split(","):
        c, p = (next(r for r in rows if r["case"] == case and r["backend"] == b) for b in ("compiled", "pytorch"))
        speedups[case] = {m: p[f"{m}_ms"] / c[f"{m}_ms"] for m in ("fwd", "fwdbwd")}
    report = {
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "memory_method": "extra peak RSS (VmHWM reset after building inputs) of a fresh subprocess per case"
        if args.device == "cpu"
        else "torch.cuda.max_memory_allocated minus allocation before the call",
        "results": rows,
        "speedup_compiled_vs_pytorch": speedups,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"device={args.device} dtype={args.dtype} threads={report['threads']} repeats={args.repeats} "
          f"(median wall ms; memory = {report['memory_method']})")
    head = f"{'case':8} {'Lq':>6} {'backend':9} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd MiB':>9} {'fwd+bwd MiB':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mem = (f"{r['fwd_peak_mib']:9.1f} {r['fwdbwd_peak_mib']:12.1f}" if "fwd_peak_mib" in r else f"{'-':>9} {'-':>12}")
        print(f"{r['case']:8} {r['lq']:6d} {r['backend']:9} {r['fwd_ms']:9.1f} {r['fwdbwd_ms']:11.1f} {mem}")
    for case, s in speedups.items():
        print(f"speed-up {case}: forward {s['fwd']:.1f}x, forward+backward {s['fwdbwd']:.1f}x")


if __name__ == "__main__":
    main()
