#!/usr/bin/env python
"""Build of panoptic_segformer and its extension ``panoptic_segformer._C``.

The extension always contains the C++ CPU kernels of multi-scale deformable attention.
The CUDA kernels (panoptic_segformer/layers/csrc/cuda/*.cu, compiled with -DWITH_CUDA) are
added when PyTorch sees a GPU and CUDA_HOME is found, or when FORCE_CUDA=1 (to build them
on a machine without a GPU, e.g. CI).  Environment variables:

- FORCE_CUDA=1           compile the CUDA kernels even without a visible GPU.
- CUDA_HOME              toolkit root; set it explicitly (e.g. /usr/local/cuda-13.0), PyTorch's
                         guess can be wrong on machines without a GPU.
- TORCH_CUDA_ARCH_LIST   target arches, e.g. "8.0;8.6;8.9;9.0+PTX" (A100, A10/3090, L4/4090,
                         H100 + PTX for newer GPUs).  Unset = the GPUs visible at build time.
- MAX_JOBS               parallel compile jobs (ninja).

Install with:  pip install --no-build-isolation -e .

nvcc flags: -O3 only.  --use_fast_math is deliberately NOT used: it flushes denormals and
uses approximate division, and the tests compare float32 results with F.grid_sample at 1e-5.
The default half/bfloat16 guards of torch.utils.cpp_extension (-D__CUDA_NO_HALF_OPERATORS__
etc.) are kept; the CUDA kernels only use c10::Half / c10::BFloat16 conversions.
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

CSRC = os.path.join("panoptic_segformer", "layers", "csrc")


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isdir(home):
        return home
    from torch.utils.cpp_extension import CUDA_HOME  # PyTorch's guess

    return CUDA_HOME if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) else None


def _cuda_archs() -> str:
    """The targets nvcc builds for, e.g. "sm_80,sm_90,compute_90" (reported by _C.cuda_archs())."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags  # what CUDAExtension passes to nvcc

    codes = [f.split("code=")[-1] for f in _get_cuda_arch_flags() if "code=" in f]
    # no spaces or quotes: the value goes through a shell in the ninja build
    return ",".join(dict.fromkeys(codes)) or "unknown"


def get_extensions():
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    # -ffp-contract=off: no implicit a*b+c -> fma, so the baseline, AVX2 and AVX-512 CPU kernels give
    # bitwise-identical float results.  The C++ standard is set by torch.utils.cpp_extension.
    cxx_flags = ["-O3", "-ffp-contract=off"]
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if force and not cuda_sources:
        raise RuntimeError(f"FORCE_CUDA=1 but there are no CUDA sources in {CSRC}/cuda")
    if force and _cuda_home() is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit found: set CUDA_HOME (e.g. /usr/local/cuda-13.0)")
    with_cuda = bool(cuda_sources) and (force or (torch.cuda.is_available() and _cuda_home() is not None))
    if with_cuda:
        return [
            CUDAExtension(
                "panoptic_segformer._C",
                sources + cuda_sources,
                include_dirs=[os.path.abspath(CSRC)],
                define_macros=[("WITH_CUDA", None)],
                # C++ only: nvcc would split the comma-separated value into several macros
                extra_compile_args={
                    "cxx": cxx_flags + [f"-DPSF_CUDA_ARCHS={_cuda_archs()}"],
                    "nvcc": ["-O3", "-DWITH_CUDA"],
                },
            )
        ]
    return [
        CppExtension(
            "panoptic_segformer._C",
            sources,
            include_dirs=[os.path.abspath(CSRC)],
            extra_compile_args={"cxx": cxx_flags},
        )
    ]


setup(
    name="panoptic_segformer",
    version="0.1.0",
    description="Panoptic SegFormer (Li et al., CVPR 2022) as a Detectron2 project",
    packages=find_packages(exclude=("tests", "tests.*", "tools", "configs", "demo")),
    python_requires=">=3.9",
    # torch, torchvision and detectron2 are installed beforehand (README); they are not listed
    # so that pip never replaces the CUDA build of PyTorch.  panopticapi-lite is installed with
    # --no-deps (its metadata pins numpy<2), so it is not listed either.
    install_requires=["numpy", "scipy", "timm", "fvcore", "pycocotools", "Pillow"],
    extras_require={
        "demo": ["opencv-python-headless", "tqdm", "matplotlib"],
        "export": ["onnx", "onnxscript", "onnxruntime"],
        "test": ["pytest"],
    },
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
