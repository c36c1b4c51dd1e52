"""Edge replication inside each image's valid area of a padded map."""
import torch

__all__ = ["edge_replicate_index"]


def edge_replicate_index(valid_sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Flat indices that map every position of a padded (height, width) map to itself inside the
    valid area and to the nearest valid position outside it.

    Args:
        valid_sizes: (B, 2) int64 valid (h, w) of each map, at least 1 each.
    Returns:
        (B, height * width) int64 indices into the flattened map.
    """
    last = (valid_sizes - 1).clamp(min=0)
    rows = torch.minimum(torch.arange(height, device=valid_sizes.device), last[:, 0:1])  # (B, H)
    cols = torch.minimum(torch.arange(width, device=valid_sizes.device), last[:, 1:2])  # (B, W)
    return (rows[:, :, None] * width + cols[:, None, :]).flatten(1)
