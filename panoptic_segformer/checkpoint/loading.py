"""The one policy for reading weights files, used by every entry point (training, evaluation,
resume, the demo, ``Predictor`` and the official-checkpoint converter).

* A ``torch.save`` file (``.pth``) is read with ``torch.load(weights_only=True)``: tensors,
  numbers, strings and containers only, so loading it cannot run code.
* A file that needs full unpickling is refused unless the caller opts in (``trust=True``; for
  users: config ``MODEL.TRUST_CHECKPOINT True`` or ``--trust-checkpoint``): every ``.pkl``
  (Detectron2 / Caffe2 model-zoo pickles, e.g. the converted ImageNet ResNets), every ``.pyth``
  (pycls), and a ``.pth`` holding objects other than tensors.
* An empty, truncated or random file gets an error that says so (:class:`CorruptCheckpointError`),
  not a bare ``EOFError`` or a suggestion to trust it.
* Weights with NaN or Inf are refused by name (:func:`check_finite`).
"""
import contextlib
import os
import pickle
import re
from typing import Any, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "NonFiniteCheckpointError",
    "TRUST_OPT_IN",
    "UntrustedCheckpointError",
    "check_finite",
    "check_trusted",
    "corrupt_file_errors",
    "first_non_finite",
    "iter_tensors",
    "load_checkpoint_file",
    "needs_full_unpickling",
]

TRUST_OPT_IN = (
    "MODEL.TRUST_CHECKPOINT True, or --trust-checkpoint on train_net.py / demo/demo.py, "
    "or Predictor(..., trust_checkpoint=True)"
)
PICKLE_EXTENSIONS = (".pkl", ".pyth")  # Detectron2 reads these with plain pickle / torch.load

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_OLD_PICKLE_STARTS = (b"(", b"}", b"]")  # first opcodes of protocol 0/1 pickles (Python 2 era)


class CheckpointError(RuntimeError):
    """A weights file that is not loaded, with the reason."""


class UntrustedCheckpointError(CheckpointError):
    """The file needs full unpickling (which can run arbitrary code) and the caller did not opt in."""


class CorruptCheckpointError(CheckpointError):
    """The file is empty, truncated, or not a checkpoint at all."""


class NonFiniteCheckpointError(CheckpointError, FloatingPointError):
    """The file holds NaN or Inf weights."""


def needs_full_unpickling(path: str) -> bool:
    """Whether ``path`` is of a format only full unpickling reads (``.pkl``, ``.pyth``)."""
    return path.lower().endswith(PICKLE_EXTENSIONS)


def _file_kind(path: str) -> str:
    """"zip" (torch.save), "pickle" (a legacy torch.save file or a plain pickle), "empty" or
    "unknown", from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty"
    if head == _ZIP_MAGIC:
        return "zip"
    if (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head[:1] in _OLD_PICKLE_STARTS:
        return "pickle"
    return "unknown"


def _check_format(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    kind = _file_kind(path)
    if kind == "empty":
        raise CorruptCheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    if kind == "unknown":
        raise CorruptCheckpointError(
            f"{path} is not a checkpoint: it is neither a torch.save file nor a pickle "
            "(corrupt, or another format)"
        )
    return kind


def check_trusted(path: str, trust: bool, opt_in: Optional[str] = TRUST_OPT_IN) -> None:
    """Raise unless ``path`` looks like a checkpoint and, if it needs full unpickling, ``trust``.

    Raises:
        FileNotFoundError: no such file.
        CorruptCheckpointError: empty or not a torch.save file / pickle.
        UntrustedCheckpointError: a ``.pkl`` / ``.pyth`` file and ``trust`` is False.
    """
    _check_format(path)
    if needs_full_unpickling(path) and not trust:
        raise UntrustedCheckpointError(
            f"refusing to unpickle {path}: loading a {path[path.rfind('.'):]} file runs whatever "
            f"code it contains. {_advice(opt_in)}"
        )


def _advice(opt_in: Optional[str]) -> str:
    convert = "re-save its tensors once as a .pth state dict (torch.save(state_dict))"
    if opt_in is None:
        return f"This entry point has no opt-in: {convert}."
    return f"If you trust its source, opt in with {opt_in}; otherwise {convert}."


def _weights_only_reason(error: Exception) -> str:
    """The short reason in torch's weights-only error, e.g. "Unsupported global: GLOBAL os.system"."""
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(error))
    return match.group(1).strip() if match else _first_sentence(error)


def _first_sentence(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__


@contextlib.contextmanager
def corrupt_file_errors(path: str):
    """Turn the errors of unpickling a damaged file into a :class:`CorruptCheckpointError`
    that names ``path`` (a bare ``EOFError`` / ``UnicodeDecodeError`` says nothing)."""
    try:
        yield
    except CheckpointError:
        raise
    except EOFError as e:
        raise CorruptCheckpointError(f"{path} is truncated (it ends in the middle of the data)") from e
    except (RuntimeError, ValueError, UnicodeDecodeError, pickle.UnpicklingError, OSError) as e:
        raise CorruptCheckpointError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {_first_sentence(e)})"
        ) from e


def load_checkpoint_file(path: str, *, trust: bool = False, opt_in: Optional[str] = TRUST_OPT_IN) -> Any:
    """Read a weights file with the project's policy (module docstring); returns its contents.

    ``trust=True`` allows full unpickling: ``.pkl`` files are read with ``pickle`` (latin1, as
    Detectron2 does), other files with ``torch.load(weights_only=False)`` when the weights-only
    reader refuses them. ``opt_in`` tells the user how to allow it, in the error message (None:
    the caller has no opt-in).

    Raises:
        CorruptCheckpointError: empty, truncated, or not a torch.save file / pickle.
        UntrustedCheckpointError: the file needs full unpickling and ``trust`` is False.
    """
    check_trusted(path, trust, opt_in)
    with corrupt_file_errors(path):
        if path.lower().endswith(".pkl"):
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if not trust:
                raise UntrustedCheckpointError(
                    f"{path} holds objects other than tensors, which torch.load(weights_only=True) "
                    f"refuses ({_weights_only_reason(e)}); loading them runs code from the file. "
                    f"{_advice(opt_in)}"
                ) from e
        return torch.load(path, map_location="cpu", weights_only=False)


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """(dotted path, tensor) of every tensor or numpy array nested in dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, np.ndarray):
        yield prefix, torch.from_numpy(obj)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from iter_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from iter_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def first_non_finite(named_tensors: Iterable[Tuple[str, Optional[torch.Tensor]]]) -> Optional[str]:
    """Name of the first floating-point tensor with a NaN or Inf, with the counts; None if none.

    E.g. ``"encoder.layers.0.self_attn.sampling_offsets.weight (1 NaN, 0 Inf of 8192 values)"``.
    """
    for name, tensor in named_tensors:
        if tensor is None or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        if not bool(torch.isfinite(tensor).all()):
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            return f"{name} ({nan} NaN, {inf} Inf of {tensor.numel()} values)"
    return None


def check_finite(obj: Any, source: str) -> None:
    """Raise :class:`NonFiniteCheckpointError` naming the first tensor of ``obj`` (a state dict
    or any nesting of dicts / lists of tensors) with a NaN or Inf; ``source`` names where it is."""
    bad = first_non_finite(iter_tensors(obj))
    if bad is not None:
        raise NonFiniteCheckpointError(f"{source} holds non-finite values: first one {bad}")
