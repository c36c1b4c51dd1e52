"""Export a Panoptic SegFormer's network (:class:`~.network.ExportableNetwork`) to a file.

Formats (``FORMATS``), each written as ``FILE_NAMES[format]`` next to ``export_meta.json``
(everything the runner needs besides the network: normalisation, test resize, padding, merging
thresholds, the stuff ids and the class names and colours for drawing):

- ``torch_export``: a ``torch.export`` ``ExportedProgram`` (.pt2). It runs with PyTorch and this
  project's op library (``import panoptic_segformer.layers``), without Detectron2.
- ``aoti``: an AOTInductor package (.pt2) compiled ahead of time for the export machine's
  device; loadable with ``torch._inductor.aoti_load_package`` (also from C++, per PyTorch's
  docs). The op runs through its registration, so the op library must be loaded as well.
- ``onnx``: ONNX (opset 18), with the deformable attention written in standard ops
  (GridSample, :mod:`.onnx_ms_deform_attn`), so stock ONNX Runtime runs it.

Every format has a dynamic batch size and dynamic H, W (multiples of ``size_divisibility``).
"""
import json
import logging
import os
from typing import Dict, Optional, Sequence, Tuple

import torch

from .network import INPUT_NAMES, OUTPUT_NAMES, ExportableNetwork

__all__ = ["FORMATS", "FILE_NAMES", "META_FILE", "export_model", "export_program", "example_inputs"]

logger = logging.getLogger(__name__)

FORMATS = ("torch_export", "aoti", "onnx")
FILE_NAMES = {"torch_export": "model.pt2", "aoti": "model_aoti.pt2", "onnx": "model.onnx"}
META_FILE = "export_meta.json"
ONNX_OPSET = 18
MAX_BATCH = 64
MAX_SIDE = 4096  # largest padded H or W an export accepts


def example_inputs(size_divisibility: int, batch: int = 2, size: Tuple[int, int] = (128, 192)):
    """(images, image_sizes) to trace with: ``batch`` images padded to ``size`` (rounded up to
    ``size_divisibility``); the second image's valid size is smaller, so padding is traced."""
    h, w = (-(-s // size_divisibility) * size_divisibility for s in size)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, h, w, generator=gen)
    sizes = torch.tensor([[h, w]] + [[max(h - size_divisibility // 2, 1), max(w - 7, 1)]] * (batch - 1))
    for i, (vh, vw) in enumerate(sizes.tolist()):
        images[i, :, vh:] = 0
        images[i, :, :, vw:] = 0
    return images, sizes


def _dynamic_shapes(size_divisibility: int):
    d = size_divisibility
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    h = torch.export.Dim("h_blocks", min=2, max=MAX_SIDE // d)
    w = torch.export.Dim("w_blocks", min=2, max=MAX_SIDE // d)
    return {"images": {0: batch, 2: d * h, 3: d * w}, "image_sizes": {0: batch}}


def export_program(model) -> torch.export.ExportedProgram:
    """``torch.export`` of the model's network (eval mode, float32) with dynamic batch and size."""
    net = ExportableNetwork(model).eval()
    args = example_inputs(model.size_divisibility)
    with torch.no_grad():
        return torch.export.export(
            net, args, dynamic_shapes=_dynamic_shapes(model.size_divisibility), strict=False
        )


def export_model(
    model,
    fmt: str,
    output_dir: str,
    *,
    metadata=None,
    input_format: str = "RGB",
    min_size_test: int = 800,
    max_size_test: int = 1333,
) -> str:
    """Export ``model`` (a :class:`PanopticSegFormer`, put in eval mode) as ``fmt`` into ``output_dir``.

    Args:
        metadata: the dataset ``Metadata`` of the model's contiguous ids; its class names and
            colours are saved for drawing (optional).
        input_format, min_size_test, max_size_test: the config's INPUT.FORMAT and test resize,
            saved for the runner.

    Returns:
        the path of the written model file. ``export_meta.json`` is written next to it.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    model.eval()
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FILE_NAMES[fmt])
    logger.info(f"exporting the network with torch.export (format {fmt}) ...")
    program = export_program(model)
    if fmt == "torch_export":
        torch.export.save(program, path)
    elif fmt == "aoti":
        logger.info("compiling with AOTInductor (minutes on a CPU) ...")
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(program, package_path=path)
    else:
        _export_onnx(model, path)
    meta = export_metadata(model, fmt, metadata, input_format, min_size_test, max_size_test)
    tmp = os.path.join(output_dir, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(output_dir, META_FILE))
    logger.info(f"wrote {path} and {META_FILE}")
    return path


def _export_onnx(model, path: str) -> None:
    from .onnx_ms_deform_attn import ms_deform_attn_onnx

    net = ExportableNetwork(model).eval()
    args = example_inputs(model.size_divisibility)
    table = {torch.ops.panoptic_segformer.ms_deform_attn_forward.default: ms_deform_attn_onnx}
    with torch.no_grad():
        program = torch.onnx.export(
            net, args, dynamo=True, opset_version=ONNX_OPSET, input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES), dynamic_shapes=_dynamic_shapes(model.size_divisibility),
            custom_translation_table=table, verbose=False,
        )
    tmp = path + ".tmp"
    program.save(tmp)
    os.replace(tmp, path)


def export_metadata(model, fmt, metadata, input_format, min_size_test, max_size_test) -> Dict:
    """The content of ``export_meta.json``."""
    names: Dict[str, Optional[Sequence]] = {}
    for key in ("thing_classes", "thing_colors", "stuff_classes", "stuff_colors"):
        value = getattr(metadata, key, None) if metadata is not None else None
        names[key] = [list(v) if isinstance(v, (tuple, list)) else v for v in value] if value else None
    return {
        "format": fmt,
        "file": FILE_NAMES[fmt],
        "torch_version": torch.__version__,
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "size_divisibility": model.size_divisibility,
        "mask_stride": model.backbone_strides[0],
        "max_batch": MAX_BATCH,
        "max_side": MAX_SIDE,
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
        "input_format": input_format,
        "min_size_test": min_size_test,
        "max_size_test": max_size_test,
        "stuff_ids": model.stuff_ids.tolist(),
        "merge": dict(model.merge_kwargs),
        "metadata_name": getattr(metadata, "name", None),
        "metadata": names,
    }
