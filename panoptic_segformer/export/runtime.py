"""Run an exported network (:mod:`.exporter`) as a Detectron2-style model, with merging in Python.

:class:`ExportedModel` takes what the eager ``PanopticSegFormer`` takes at inference (a list of
dicts with "image" (3, h, w) 0-255 in the model's input format, optional "height" / "width") and
returns [{"panoptic_seg": (int32 (height, width) id map, segments_info)}]; so it plugs into
:class:`~panoptic_segformer.predictor.Predictor` and the demo (``demo/demo.py --exported DIR``).
It normalises and pads each group of images of one padded size, runs the network on the group,
and merges every image's candidates with :func:`~..modeling.merging.merge_candidates`, as the
eager model does.

Users of another runtime call the network themselves and then :func:`merge_outputs`.
"""
import json
import math
import os
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..modeling.merging import merge_candidates
from .exporter import FORMATS, META_FILE
from .network import INPUT_NAMES, OUTPUT_NAMES

__all__ = ["ExportedModel", "load_network", "merge_outputs", "normalise_and_pad", "read_export_meta"]


def read_export_meta(path: str) -> Tuple[Dict, str]:
    """(``export_meta.json`` content, model file) of an export folder or of a model file in it."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    meta_path = os.path.join(folder, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: {path} is not an export of tools/export_model.py")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") not in FORMATS:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}; expected one of {FORMATS}")
    file = path if os.path.isfile(path) else os.path.join(folder, meta["file"])
    if not os.path.isfile(file):
        raise FileNotFoundError(f"exported model file {file} not found (named in {meta_path})")
    return meta, file


def load_network(file: str, fmt: str, device: str = "cpu") -> Callable:
    """A function (images, image_sizes) -> tuple of the :data:`OUTPUT_NAMES` tensors."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    if fmt in ("torch_export", "aoti"):
        from .. import layers  # noqa: F401  (registers the deformable attention op)
    if fmt == "torch_export":
        program = torch.export.load(file)
        module = program.module().to(device)
        return lambda images, sizes: tuple(module(images, sizes))
    if fmt == "aoti":
        runner = torch._inductor.aoti_load_package(file)
        return lambda images, sizes: tuple(runner(images, sizes))
    import onnxruntime

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
    session = onnxruntime.InferenceSession(file, providers=providers)
    names = [i.name for i in session.get_inputs()]
    if tuple(names) != INPUT_NAMES:
        raise ValueError(f"{file}: ONNX inputs are {names}, expected {list(INPUT_NAMES)}")

    def run(images, sizes):
        outs = session.run(list(OUTPUT_NAMES), {"images": images.cpu().numpy(), "image_sizes": sizes.cpu().numpy()})
        return tuple(torch.from_numpy(o).to(images.device) for o in outs)

    return run


def normalise_and_pad(images: Sequence[torch.Tensor], pixel_mean, pixel_inv_std, divisor: int):
    """The network input of ``images`` (3, h, w) 0-255: ((B, 3, H, W) float32 normalised as the
    eager model, zero-padded to multiples of ``divisor``, on the device of ``pixel_mean``;
    (B, 2) int64 valid sizes on the CPU)."""
    sizes = torch.tensor([tuple(img.shape[-2:]) for img in images], dtype=torch.long)
    h, w = (int(-(-sizes[:, i].max() // divisor) * divisor) for i in (0, 1))
    batch = torch.zeros(len(images), 3, h, w, device=pixel_mean.device)
    for i, img in enumerate(images):
        x = (img.to(pixel_mean.device).float() - pixel_mean) * pixel_inv_std
        batch[i, :, : x.shape[1], : x.shape[2]] = x
    return batch, sizes


def merge_outputs(outputs: Dict[str, torch.Tensor], index: int, image_size, out_size, meta: Dict):
    """The panoptic result of image ``index`` of a batch from the exported network's outputs.

    Args:
        outputs: {name in OUTPUT_NAMES: tensor} of one network call.
        image_size: the valid (h, w) of the image in the network input.
        out_size: (height, width) of the id map (e.g. the original image size).
        meta: ``export_meta.json`` (mask stride, stuff ids, merging thresholds).

    Returns:
        (int32 (height, width) id map, segments_info) as the eager model's "panoptic_seg".
    """
    s = meta["mask_stride"]
    h8, w8 = math.ceil(image_size[0] / s), math.ceil(image_size[1] / s)
    things, stuff = outputs["thing_masks"][index], outputs["stuff_masks"][index]
    stuff_ids = torch.as_tensor(meta["stuff_ids"], dtype=torch.long, device=things.device)
    masks = torch.cat([things, stuff])[:, :h8, :w8]
    labels = torch.cat([outputs["thing_labels"][index].long(), stuff_ids])
    probs = torch.cat([outputs["thing_scores"][index], outputs["stuff_scores"][index]])
    is_thing = torch.arange(len(labels), device=things.device) < len(things)
    return merge_candidates(masks, labels, probs, is_thing, tuple(out_size), **meta["merge"])


class ExportedModel:
    """An exported network plus its pre- and post-processing, called like the eager model.

    Attributes:
        meta: the export's ``export_meta.json``; format: its format; file: the model file.
    """

    def __init__(self, path: str, device: str = "cpu"):
        """``path``: an export folder or the model file in it (next to ``export_meta.json``)."""
        self.meta, self.file = read_export_meta(path)
        self.format = self.meta["format"]
        self.device = torch.device(device)
        self.network = load_network(self.file, self.format, device)
        self.pixel_mean = torch.tensor(self.meta["pixel_mean"], device=self.device).view(-1, 1, 1)
        # the eager model's normalisation: (x - mean) * float32(1 / std in float64)
        inv_std = (1 / torch.tensor(self.meta["pixel_std"], dtype=torch.float64)).float()
        self.pixel_inv_std = inv_std.to(self.device).view(-1, 1, 1)

    def eval(self):  # Predictor / Detectron2 conventions
        return self

    def run_network(self, images: Sequence[torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Normalise and pad ``images`` (3, h, w) of one padded size; run the network.

        Returns ({output name: tensor}, (B, 2) int64 valid sizes).
        """
        batch, sizes = normalise_and_pad(
            images, self.pixel_mean, self.pixel_inv_std, self.meta["size_divisibility"]
        )
        outs = self.network(batch, sizes.to(self.device))
        return dict(zip(OUTPUT_NAMES, outs)), sizes

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict]:
        if not batched_inputs:
            raise ValueError("batched_inputs is empty")
        if len(batched_inputs) > self.meta["max_batch"]:
            raise ValueError(f"at most {self.meta['max_batch']} images per call, got {len(batched_inputs)}")
        d = self.meta["size_divisibility"]
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, x in enumerate(batched_inputs):
            img = x["image"]
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i} must be (3, h, w), got {tuple(img.shape)}")
            padded = tuple(-(-s // d) * d for s in img.shape[-2:])
            if max(padded) > self.meta["max_side"]:
                raise ValueError(f"image {i} of size {tuple(img.shape[-2:])} exceeds the export's {self.meta['max_side']} px")
            groups.setdefault(padded, []).append(i)
        results: List[Dict] = [{} for _ in batched_inputs]
        for idx in groups.values():
            outputs, sizes = self.run_network([batched_inputs[i]["image"] for i in idx])
            for j, i in enumerate(idx):
                x = batched_inputs[i]
                h, w = sizes[j].tolist()
                out_size = (x.get("height", h), x.get("width", w))
                results[i] = {"panoptic_seg": merge_outputs(outputs, j, (h, w), out_size, self.meta)}
        return results

    def metadata(self):
        """A Detectron2 ``Metadata`` with the export's class names and colours (for drawing)."""
        from detectron2.data.catalog import Metadata

        fields = {k: v for k, v in self.meta["metadata"].items() if v is not None}
        return Metadata(name=self.meta.get("metadata_name") or "exported", **fields)
