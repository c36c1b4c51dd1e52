"""Checkpoints: the safe loading policy, the checkpointer every entry point uses, and the
conversion of checkpoints from other code bases to this project's parameter names."""
from .checkpointer import SafeCheckpointer, atomic_write
from .loading import (
    TRUST_OPT_IN,
    CheckpointError,
    CorruptCheckpointError,
    NonFiniteCheckpointError,
    UntrustedCheckpointError,
    check_finite,
    first_non_finite,
    load_checkpoint_file,
)
from .official import DROPPED_PREFIXES, compare_with_model, convert_official_state_dict

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "DROPPED_PREFIXES",
    "NonFiniteCheckpointError",
    "SafeCheckpointer",
    "TRUST_OPT_IN",
    "UntrustedCheckpointError",
    "atomic_write",
    "check_finite",
    "compare_with_model",
    "convert_official_state_dict",
    "first_non_finite",
    "load_checkpoint_file",
]
