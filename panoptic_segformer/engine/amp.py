"""Mixed-precision training loop that works on CUDA and on CPU."""
import time

import torch
from detectron2.engine import AMPTrainer

__all__ = ["amp_dtype", "AutocastTrainer"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype(precision: str) -> torch.dtype:
    """``SOLVER.AMP.PRECISION`` ("float16" / "bfloat16") → torch dtype."""
    if precision not in _DTYPES:
        raise ValueError(f"SOLVER.AMP.PRECISION must be one of {sorted(_DTYPES)}, got {precision!r}")
    return _DTYPES[precision]


class AutocastTrainer(AMPTrainer):
    """Detectron2's :class:`AMPTrainer` for any device type.

    The stock one asserts CUDA. Here the forward pass runs under
    ``torch.autocast(device_type, dtype=precision)``; the loss is scaled with a
    ``torch.amp.GradScaler`` for float16 (disabled, i.e. a pass-through, for bfloat16, which
    needs no scaling). ``GradScaler.step`` unscales the gradients before the optimizer's
    ``step``, so gradient clipping inside the optimizer sees true magnitudes.
    """

    def __init__(self, model, data_loader, optimizer, *, device_type: str,
                 precision: torch.dtype = torch.float16, **kwargs):
        scaler = torch.amp.GradScaler(device_type, enabled=precision == torch.float16)
        super().__init__(model, data_loader, optimizer, grad_scaler=scaler, precision=precision,
                         **kwargs)
        self.device_type = device_type

    def run_step(self):
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(device_type=self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
