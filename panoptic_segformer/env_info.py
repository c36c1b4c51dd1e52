"""A one-line report of the environment: Python, PyTorch, CUDA, Detectron2 and the compiled op.

    python -m panoptic_segformer.env_info [--detectron2-source TEXT]

printed by ``scripts/setup.sh`` (``make test`` / ``make quickstart``) and at the top of the test
run, so that a log says what ran. Works without Detectron2 and without a built op.
"""
import argparse
import importlib.metadata
import json
import platform
from typing import Optional

__all__ = ["environment_report"]


def _detectron2(source: Optional[str]) -> str:
    try:
        import detectron2
    except ImportError:
        return "detectron2 NOT installed"
    where = source
    if not where:
        try:  # PEP 610: where pip installed it from (a folder, an archive or a git URL)
            url = json.loads(importlib.metadata.distribution("detectron2").read_text("direct_url.json") or "{}")
            where = url.get("url")
        except (importlib.metadata.PackageNotFoundError, ValueError):
            where = None
    return f"detectron2 {detectron2.__version__} ({where or detectron2.__path__[0]})"


def _op() -> str:
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        from panoptic_segformer import _C
    except ImportError as e:
        return f"op NOT built ({e})"
    cuda = _C.cuda_archs() if _C.cuda_compiled() else ""
    return f"op: CPU {_C.cpu_kernel_isa()}, CUDA {cuda or 'no kernels'}"


def environment_report(detectron2_source: Optional[str] = None) -> str:
    """``python X | torch X | CUDA X | detectron2 X (source) | op: CPU isa, CUDA archs``."""
    parts = [f"python {platform.python_version()}"]
    try:
        import torch
    except ImportError:
        return " | ".join(parts + ["torch NOT installed"])
    parts.append(f"torch {torch.__version__}")
    if torch.version.cuda is None:
        parts.append("CUDA: CPU-only build")
    else:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpu = f"{gpus} GPU ({torch.cuda.get_device_name(0)})" if gpus else "no GPU"
        parts.append(f"CUDA {torch.version.cuda}, {gpu}")
    parts.append(_detectron2(detectron2_source))
    parts.append(_op())
    return " | ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectron2-source", help="how Detectron2 was obtained (printed as given)")
    args = parser.parse_args(argv)
    print("== environment:", environment_report(args.detectron2_source))


if __name__ == "__main__":
    main()
