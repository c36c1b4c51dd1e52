"""``torch.compile`` of a Panoptic SegFormer's network stages for inference, with an eager fallback.

:func:`compile_stages` compiles, in place, the ``forward`` of the stage modules: by default the
backbone, the neck, the encoder and the location decoder. The mask decoders are left eager by
default: compiled, they were no faster on a CPU (their time goes to large batched matmuls and
attention that inductor leaves to the same kernels) and they add the most graphs; pass
``stages=ALL_STAGE_MODULES`` to compile them too. The parameters and the state dict are
unchanged; top-k selection, padding bookkeeping, resizing and merging stay eager. A stage
whose compilation fails (no C++ compiler, an unsupported op, a backend error) logs one warning
and runs eagerly from then on; an error that eager code raises too (bad input) is raised as is.

Compilation happens on the first call of each stage (several minutes for R50 on a 2-core CPU),
inside the autocast region of the model's precision: fp32 and bf16 are separate graphs.
What recompiles (inductor, ``dynamic=None``, PyTorch's default; measured on the quickstart
model over 11 input sizes): the first padded input size compiles static graphs; the second
distinct size recompiles every stage once with symbolic sizes; later sizes mostly reuse those
graphs, but a size that crosses a shape guard (e.g. the convolution heuristics of a
feature-map size threshold) recompiles the backbone and neck again (2 of 9 further sizes did).
Each code object keeps at most ``torch._dynamo.config.recompile_limit`` graphs (8 by default),
after which that stage runs eagerly. ``dynamic=False`` gives one static graph per padded size.
"""
import logging
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["ALL_STAGE_MODULES", "STAGE_MODULES", "CompiledForward", "compile_stages"]

logger = logging.getLogger(__name__)

# submodules of PanopticSegFormer compiled by default (absent ones are skipped)
STAGE_MODULES = ("backbone", "neck", "head.encoder", "head.location_decoder")
ALL_STAGE_MODULES = STAGE_MODULES + ("head.thing_mask_decoder", "head.stuff_mask_decoder")


class CompiledForward:
    """A module's ``forward`` replaced by its compiled version, falling back to the eager one.

    Attributes:
        name: the module's name in the model (for messages).
        failed: the exception that made it fall back to eager, or None.
    """

    def __init__(self, name: str, eager: Callable, compiled: Callable):
        self.name = name
        self.eager = eager
        self.compiled = compiled
        self.failed: Optional[BaseException] = None

    def __call__(self, *args, **kwargs):
        if self.failed is not None:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (any compile failure falls back, see below)
            # an input error raises again here, from the eager code, and keeps the compiled path
            out = self.eager(*args, **kwargs)
            self.failed = e
            logger.warning(f"torch.compile of {self.name} failed ({_root_cause(e)}); running {self.name} eagerly")
            return out


def _root_cause(e: BaseException) -> str:
    """"Type: first line" of the innermost exception (a backend's error wrapped by dynamo)."""
    while getattr(e, "inner_exception", None) is not None or e.__cause__ is not None:
        e = getattr(e, "inner_exception", None) or e.__cause__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def compile_stages(
    model: nn.Module,
    stages: Sequence[str] = STAGE_MODULES,
    *,
    backend: str = "inductor",
    dynamic: Optional[bool] = None,
    freezing: bool = True,
    options: Optional[Dict] = None,
) -> List[str]:
    """Compile the ``forward`` of each stage module of ``model`` in place.

    Args:
        model: the model (usually in eval mode); its parameters must not change afterwards
            when ``freezing`` (the compiled graphs hold them as constants).
        stages: dotted submodule names; names the model does not have are skipped.
        backend, dynamic: passed to ``torch.compile``.
        freezing: inductor's freezing (weights folded as constants: conv-BN folding, weight
            prepacking for oneDNN, casts of the weights done once). It applies when gradients
            are disabled (``torch.no_grad``), as in the Predictor and evaluation.
        options: further inductor options (``torch.compile(options=...)``).

    Returns:
        the names of the compiled modules.
    """
    if backend == "inductor":
        options = {"freezing": freezing, **(options or {})}
    compiled = []
    for name in stages:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module.forward, CompiledForward):
            raise RuntimeError(f"{name} is already compiled")
        eager = module.forward
        fn = torch.compile(eager, backend=backend, dynamic=dynamic, options=options)
        module.forward = CompiledForward(name, eager, fn)
        compiled.append(name)
    return compiled
