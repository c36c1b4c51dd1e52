#!/usr/bin/env python
"""Inference speed of this checkout's variants against fp32 eager of an earlier commit, in one run.

    python tools/benchmark_against_commit.py 04b8061 --rounds 2 -- \
        --config-file configs/R50.yaml --height 800 --width 1333 --device cpu \
        --variants fp32 bf16+cl bf16+cl+compile --iters 3

The earlier commit is checked out into a temporary git worktree (``--workdir``, kept for reuse)
and its op is built there (``python setup.py build_ext --inplace``, CPU only). Then, for each
round, the earlier commit's ``tools/benchmark_inference.py`` (fp32 eager) and this checkout's
(every variant) run one after the other, each in its own process with the same arguments
(``--variants`` only for this checkout), and a final run of the earlier commit closes the run,
so a change of the machine's load shows as a spread of the baseline. The table gives, per
image, the median over the rounds of each stage and the total, and each total over the
baseline's median.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commit", help="the earlier commit (the baseline: its fp32 eager inference)")
    parser.add_argument("--rounds", type=int, default=1, help="baseline / current pairs (default 1)")
    parser.add_argument("--workdir", default=None, help="worktree of the commit (default: under TMPDIR)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.epilog = "Arguments after -- go to tools/benchmark_inference.py."
    return parser


def _run(cmd: List[str], cwd: Path) -> str:
    print(f"== {cwd}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (exit {proc.returncode})")
    return proc.stdout


def prepare_baseline(commit: str, workdir: Path) -> Path:
    """Worktree of ``commit`` with its op built; reused when it is already there."""
    if not (workdir / ".git").exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(workdir), commit], check=True)
    if not list((workdir / "panoptic_segformer").glob("_C*.so")):
        env = {**os.environ, "FORCE_CUDA": "0", "TORCH_CUDA_ARCH_LIST": ""}
        print(f"== building the op of {commit} in {workdir} (a few minutes)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=workdir, env=env,
                       check=True, stdout=subprocess.DEVNULL)
    return workdir


def _without_variants(args: List[str]) -> List[str]:
    """``args`` without ``--variants NAME...`` (the baseline has no variants)."""
    out, skipping = [], False
    for a in args:
        if a == "--variants":
            skipping = True
        elif skipping and a.startswith("--"):
            skipping = False
        if not skipping:
            out.append(a)
    return out


def summarise(baseline: List[Dict], current: List[Dict]) -> Dict:
    """Median per stage and total of the baseline runs and of each variant over the rounds."""
    def median_of(runs: List[Dict]) -> Dict:
        stages = {k: statistics.median(r["stages_ms"].get(k, 0.0) for r in runs) for k in runs[0]["stages_ms"]}
        return {"total_ms": statistics.median(r["total_ms"] for r in runs), "stages_ms": stages,
                "totals_ms": [r["total_ms"] for r in runs]}

    table = {"baseline fp32": median_of(baseline)}
    for name in current[0]["variants"]:
        table[name] = median_of([c["variants"][name] for c in current])
    base = table["baseline fp32"]["total_ms"]
    for r in table.values():
        r["ratio"] = r["total_ms"] / base
    return table


def format_table(table: Dict, commit: str) -> str:
    names = list(table)
    width = max(14, *(len(n) + 2 for n in names))
    lines = [f"{'ms / image (median)':<22}" + "".join(f"{n:>{width}}" for n in names)]
    for stage in table["baseline fp32"]["stages_ms"]:
        lines.append(f"  {stage:<20}" + "".join(f"{r['stages_ms'].get(stage, 0.0):>{width}.1f}" for r in table.values()))
    lines.append(f"{'total':<22}" + "".join(f"{r['total_ms']:>{width}.1f}" for r in table.values()))
    lines.append(f"{'time / baseline':<22}" + "".join(f"{r['ratio']:>{width}.2f}" for r in table.values()))
    lines.append(f"baseline = {commit} fp32 eager; its totals over the run: "
                 + ", ".join(f"{t:.0f}" for t in table["baseline fp32"]["totals_ms"]) + " ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, bench = get_parser().parse_args(argv[:split]), argv[split + 1:]
    if args.rounds < 1:
        print(f"--rounds must be >= 1, got {args.rounds}", file=sys.stderr)
        return 2
    if "--config-file" not in bench:
        print("give the benchmark's arguments after --, at least --config-file", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / f"psf-baseline-{args.commit}")
    base_repo = prepare_baseline(args.commit, workdir)
    tool = ["tools/benchmark_inference.py", "--json"]
    base_cmd = [sys.executable, *tool, *_without_variants(bench)]
    current_cmd = [sys.executable, *tool, "--no-flops", *bench]
    baseline, current = [], []
    for _ in range(args.rounds):
        baseline.append(json.loads(_run(base_cmd, base_repo).strip().splitlines()[-1]))
        current.append(json.loads(_run(current_cmd, REPO).strip().splitlines()[-1]))
    baseline.append(json.loads(_run(base_cmd, base_repo).strip().splitlines()[-1]))
    table = summarise(baseline, current)
    load = [c.get("load_before") for c in current] + [c.get("load_after") for c in current]
    if args.json:
        print(json.dumps({"commit": args.commit, "bench_args": bench, "load": load, "table": table}))
    else:
        print(format_table(table, args.commit))
        print(f"load average around this checkout's runs: {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
