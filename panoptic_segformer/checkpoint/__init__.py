"""Conversion of checkpoints from other code bases to this project's parameter names."""
from .official import DROPPED_PREFIXES, compare_with_model, convert_official_state_dict

__all__ = ["DROPPED_PREFIXES", "compare_with_model", "convert_official_state_dict"]
