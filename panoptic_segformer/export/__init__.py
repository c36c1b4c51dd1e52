"""Deployment: export the network to torch.export / AOTInductor / ONNX and run the exports.

- :mod:`.network`: :class:`ExportableNetwork`, a normalised padded batch in, candidates out;
- :mod:`.exporter`: :func:`export_model` writes a format's file and ``export_meta.json``;
- :mod:`.onnx_ms_deform_attn`: the deformable attention in standard ONNX ops;
- :mod:`.runtime`: :class:`ExportedModel` runs an export like the eager model (merging in
  Python, :func:`merge_outputs`).
"""
from .exporter import FORMATS, export_model
from .network import INPUT_NAMES, OUTPUT_NAMES, ExportableNetwork
from .runtime import ExportedModel, merge_outputs

__all__ = ["FORMATS", "INPUT_NAMES", "OUTPUT_NAMES", "ExportableNetwork", "ExportedModel", "export_model", "merge_outputs"]
