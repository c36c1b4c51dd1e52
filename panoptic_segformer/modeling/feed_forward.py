"""The post-norm feed-forward block shared by the encoder and location-decoder layers."""
import torch.nn.functional as F
from torch import nn

__all__ = ["PostNormFeedForward"]


class PostNormFeedForward(nn.Module):
    """x -> LN(x + Dropout(Linear(Dropout(ReLU(Linear(x)))))), as mmcv's FFN + norm (SPEC §1.4)."""

    def __init__(self, d_model=256, dim_feedforward=1024, dropout=0.1):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout1 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x):
        """x: (..., d_model) -> same shape."""
        y = self.linear2(self.dropout1(F.relu(self.linear1(x))))
        return self.norm(x + self.dropout2(y))
