"""``SafeCheckpointer``: Detectron2's checkpointer with the project's loading policy, atomic
writes, no non-finite checkpoints, and a resume that survives a crash.

Every entry point loads and saves through it: ``train_net.py`` (training, ``--eval-only``,
``--resume``), ``Predictor`` and so the demo.
"""
import glob
import logging
import os
from typing import Any, Callable, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .loading import (
    TRUST_OPT_IN,
    CheckpointError,
    CorruptCheckpointError,
    NonFiniteCheckpointError,
    check_finite,
    check_trusted,
    corrupt_file_errors,
    load_checkpoint_file,
    needs_full_unpickling,
)

__all__ = ["SafeCheckpointer", "atomic_write"]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through ``write(file)`` so that ``path`` is either the old file or the
    complete new one, never a partial file: write a temporary file in the same folder, flush it
    to disk, then rename it over ``path``. A kill mid-way leaves at most a hidden
    ``.<name>.<pid>.tmp`` file behind."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


class SafeCheckpointer(DetectionCheckpointer):
    """A ``DetectionCheckpointer`` that

    * loads with :func:`~panoptic_segformer.checkpoint.load_checkpoint_file`'s policy:
      ``torch.load(weights_only=True)``; ``.pkl`` / ``.pyth`` files and ``.pth`` files with
      custom objects only with ``trust_pickle=True``; clear errors for empty, truncated and
      random files; weights with NaN / Inf refused by name;
    * saves atomically (checkpoint and ``last_checkpoint`` tag) and refuses to save a
      checkpoint with a non-finite tensor (nothing is written, the tag is unchanged);
    * on ``resume_or_load(..., resume=True)`` falls back, with a warning, to the newest
      loadable ``model_*.pth`` of ``save_dir`` when ``last_checkpoint`` is empty, missing or
      names a missing, truncated or non-finite file.

    After ``load``, ``incompatible`` holds the missing / unexpected keys of the model state dict.
    """

    def __init__(self, model, save_dir: str = "", *, trust_pickle: bool = False,
                 opt_in: str = TRUST_OPT_IN, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.trust_pickle = trust_pickle
        self.opt_in = opt_in
        self.incompatible = None
        self._loading: Optional[str] = None
        self._resumed_from: Optional[str] = None

    # ------------------------------------------------------------------ loading
    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        if path and "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            return super().load(path, *args, **kwargs)
        finally:  # Detectron2 leaves it set when loading fails, which breaks the next load
            self._parsed_url_during_load = None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._loading = filename
        if needs_full_unpickling(filename):  # Detectron2 unpickles these itself
            check_trusted(filename, self.trust_pickle, self.opt_in)
            with corrupt_file_errors(filename):
                return super()._load_file(filename)
        return super()._load_file(filename)  # calls _torch_load

    def _torch_load(self, f: str) -> Dict[str, Any]:
        loaded = load_checkpoint_file(f, trust=self.trust_pickle, opt_in=self.opt_in)
        if not isinstance(loaded, dict):
            raise CorruptCheckpointError(f"{f} holds a {type(loaded).__name__}, not a checkpoint dict")
        return loaded

    def _load_model(self, checkpoint: Dict[str, Any]):
        state = checkpoint["model"]
        if not isinstance(state, dict):
            raise CorruptCheckpointError(
                f"{self._loading}: 'model' is a {type(state).__name__}, not a state dict"
            )
        self._convert_ndarray_to_tensor(state)
        check_finite(state, f"checkpoint {self._loading}")
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

    # ------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs: Any) -> None:
        """Save ``{model, checkpointables..., **kwargs}`` to ``save_dir/name.pth`` atomically and
        tag it in ``last_checkpoint``; raise :class:`NonFiniteCheckpointError` (writing nothing)
        if any tensor in it is NaN or Inf."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        check_finite(data, f"the checkpoint {save_file} (not saved)")
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(
            os.path.join(self.save_dir, LAST_CHECKPOINT),
            lambda f: f.write(last_filename_basename),
            mode="w",
        )

    # ------------------------------------------------------------------ resume
    def has_checkpoint(self) -> bool:
        """True when ``last_checkpoint`` exists or a resume fell back to another checkpoint."""
        return self._resumed_from is not None or super().has_checkpoint()

    def _saved_checkpoints(self) -> List[str]:
        """The ``model_*.pth`` files of ``save_dir``, newest first."""
        files = [f for f in glob.glob(os.path.join(glob.escape(self.save_dir), "model_*.pth"))
                 if os.path.isfile(f)]
        return sorted(files, key=lambda f: (os.path.getmtime(f), f), reverse=True)

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """``resume=False``: load the model from ``path`` (nothing else). ``resume=True``: load
        everything from the checkpoint named in ``last_checkpoint``, else from the newest
        loadable ``model_*.pth`` (with a warning); from ``path`` when ``save_dir`` holds neither
        a tag nor a checkpoint (a first run)."""
        if not resume:
            return self.load(path, checkpointables=[])
        tag_exists = super().has_checkpoint()
        tagged = self.get_checkpoint_file() if tag_exists else ""
        saved = self._saved_checkpoints()
        if not tag_exists and not saved:
            return self.load(path, checkpointables=[])
        tag_file = os.path.join(self.save_dir, LAST_CHECKPOINT)
        if not tag_exists:
            problem = f"{tag_file} is missing"
        elif os.path.normpath(tagged) == os.path.normpath(self.save_dir):
            problem = f"{tag_file} is empty"
        elif not os.path.isfile(tagged):
            problem = f"{tag_file} names {tagged}, which does not exist"
        else:
            problem = None
        candidates = ([tagged] if problem is None else []) + [f for f in saved if f != tagged]
        failures = [problem] if problem else []
        for candidate in candidates:
            try:
                loaded = self.load(candidate)
            except (CorruptCheckpointError, NonFiniteCheckpointError) as e:
                failures.append(str(e))
                logger.warning(f"Cannot resume from {candidate}: {e}")
                continue
            if failures:
                logger.warning(f"Resumed from {candidate} instead of the last checkpoint: " + "; ".join(failures))
            self._resumed_from = candidate
            return loaded
        raise CheckpointError(
            f"cannot resume: no loadable checkpoint in {self.save_dir} (" + "; ".join(failures)
            + "). Start a new run without --resume or with another OUTPUT_DIR."
        )
