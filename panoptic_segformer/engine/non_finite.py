"""Stop training on non-finite values before the optimizer step writes them.

One NaN gradient anywhere makes the global gradient norm NaN, and full-model clipping then
multiplies EVERY gradient by ``clip / NaN``: a single step turns almost all parameters NaN. The
optimizers built by :func:`~panoptic_segformer.engine.build_optimizer` therefore check the total
gradient norm before each step (full-model clipping computes it anyway) and, only when it is not
finite, look up which parameter or gradient is to blame and raise
:class:`NonFiniteTrainingError`. The parameters are left as they were.

A NaN parameter usually shows already in the forward pass (the deformable attention propagates
NaN like ``grid_sample``): the model checks its location outputs in training and raises the same
error through :func:`non_finite_output_error` before the loss and the matching see them.
"""
from typing import Iterator, Optional, Tuple

import torch

from ..checkpoint import first_non_finite

__all__ = ["NonFiniteTrainingError", "non_finite_gradient_error", "non_finite_output_error"]


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped before an optimizer step because a gradient (or parameter) is NaN / Inf."""


def _named_parameters(optimizer: torch.optim.Optimizer) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, parameter) of every parameter of ``optimizer``; names from the groups'
    ``param_names`` (see ``get_param_groups``), else "<group name>[i]"."""
    for g, group in enumerate(optimizer.param_groups):
        names = group.get("param_names") or [
            f"{group.get('name', f'group{g}')}[{i}]" for i in range(len(group["params"]))
        ]
        yield from zip(names, group["params"])


def _iteration() -> Optional[int]:
    from detectron2.utils.events import get_event_storage

    try:
        return get_event_storage().iter
    except AssertionError:  # not inside a training loop's EventStorage
        return None


def _where() -> str:
    iteration = _iteration()
    return f" at iteration {iteration}" if iteration is not None else ""


_ADVICE = (
    "The parameters were not updated and no checkpoint with non-finite values is written; resume "
    "from the last checkpoint (e.g. with a lower SOLVER.BASE_LR or SOLVER.AMP.PRECISION bfloat16) "
    "or check the inputs and the weights."
)


def non_finite_output_error(named_parameters: Iterator[Tuple[str, torch.Tensor]], what: str) -> NonFiniteTrainingError:
    """The error to raise when ``what`` (outputs of the forward pass) hold NaN / Inf: names the
    first non-finite parameter of ``named_parameters`` (none: the inputs are to blame)."""
    bad_param = first_non_finite((n, p.detach()) for n, p in named_parameters)
    return NonFiniteTrainingError(
        f"Training stopped{_where()} before the loss: {what} are not finite. First non-finite "
        f"parameter: {bad_param or 'none (check the input images)'}. {_ADVICE}"
    )


def non_finite_gradient_error(optimizer: torch.optim.Optimizer, total_norm) -> NonFiniteTrainingError:
    """The error to raise when the total gradient norm of ``optimizer`` is ``total_norm`` (NaN /
    Inf): names the first non-finite parameter and the first non-finite gradient, in
    parameter order. Scans every tensor, so it is meant for the failure path only."""
    named = list(_named_parameters(optimizer))
    bad_param = first_non_finite((n, p.detach()) for n, p in named)
    bad_grad = first_non_finite((n, p.grad) for n, p in named)
    return NonFiniteTrainingError(
        f"Training stopped{_where()} before the optimizer step: the gradient norm is {float(total_norm)}. "
        f"First non-finite parameter: {bad_param or 'none'}; first non-finite gradient: "
        f"{bad_grad or 'none'}. {_ADVICE}"
    )
