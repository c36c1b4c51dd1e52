"""Inference precision: the names "fp32" / "bf16" / "fp16", what the device supports, and the
autocast region of the network.

In "bf16" / "fp16" the network stages (backbone, neck + encoder, location decoder, mask
decoders) run under ``torch.autocast``; post-processing (top-k, mask resizing, mask-wise
merging) always runs in float32 on float32 inputs (see ``PanopticSegFormer``). Which op runs in
which dtype inside the region (PyTorch's autocast rules, plus the project's own casts):

- reduced precision (fp32 accumulation inside oneDNN / cuBLAS): convolutions, Linear layers,
  matmul / bmm / baddbmm (attention logits, the mask branch's per-level projections),
  scaled-dot-product attention;
- float32: positional encodings, padding-aware GroupNorm statistics (``masked_group_norm``),
  MSDA sampling locations and attention weights (softmax in float32), the deformable op
  itself on CPU (the value is cast to float32 and the kernel accumulates in float32; on CUDA the
  kernel reads the reduced value and accumulates in float32), reference points and boxes;
- the input dtype, with float32 statistics inside the kernel: LayerNorm, softmax of the mask
  decoders' attention, GELU / ReLU, bilinear upsampling of the coarse mask levels (on CPU;
  CUDA autocast runs LayerNorm and softmax in float32).
"""
import contextlib
import logging

import torch

__all__ = ["PRECISIONS", "autocast", "check_precision", "native_cpu_support", "precision_dtype"]

logger = logging.getLogger(__name__)

# name -> dtype; the long names are the spellings of SOLVER.AMP.PRECISION
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
PRECISIONS = ("fp32", "bf16", "fp16")


def precision_dtype(precision: str) -> torch.dtype:
    """"fp32" / "bf16" / "fp16" (or "float32" / "bfloat16" / "float16") -> torch dtype."""
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {list(PRECISIONS)} (or {sorted(set(_DTYPES) - set(PRECISIONS))}), got {precision!r}")
    return _DTYPES[precision]


def native_cpu_support(dtype: torch.dtype) -> bool:
    """Whether this CPU has native oneDNN kernels for ``dtype`` (AVX512-BF16 / AMX for bf16,
    AVX512-FP16 / AMX-FP16 for fp16); without them PyTorch emulates the type, slower than fp32."""
    if dtype == torch.float32:
        return True
    if not torch.backends.mkldnn.is_available():
        return False
    probe = {
        torch.bfloat16: "_is_mkldnn_bf16_supported",
        torch.float16: "_is_mkldnn_fp16_supported",
    }[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):  # an older or newer PyTorch without the probe
        flags = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}[dtype]
        try:
            with open("/proc/cpuinfo") as f:
                info = f.read()
        except OSError:
            return False
        return any(flag in info.split() for flag in flags)


def check_precision(precision: str, device) -> torch.dtype:
    """Validate ``precision`` for inference on ``device``; return its dtype.

    Raises:
        ValueError: an unknown name.
        RuntimeError: "bf16" on a CUDA device without bf16 support.
    Warns (once per call) where the CPU has no native kernels for the type: the result is
    correct but slower than fp32.
    """
    dtype = precision_dtype(precision)
    device = torch.device(device)
    if dtype == torch.float32:
        return dtype
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise RuntimeError(
                f"precision {precision!r}: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                "use 'fp16' or 'fp32'"
            )
    elif device.type == "cpu":
        if not native_cpu_support(dtype):
            needs = "AVX512-BF16 or AMX" if dtype == torch.bfloat16 else "AVX512-FP16 or AMX-FP16"
            logger.warning(
                f"precision {precision!r}: this CPU has no native {dtype} matrix kernels ({needs}); PyTorch "
                "emulates them, which is correct but slower than 'fp32'"
            )
    else:
        raise RuntimeError(f"precision {precision!r} is supported on cpu and cuda devices, not {device.type}")
    return dtype


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """The autocast region of ``precision`` on ``device`` (a no-op context for "fp32")."""
    dtype = precision_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
