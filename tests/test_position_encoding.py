import math

import pytest
import torch

from conftest import requires_detectron2

pytestmark = requires_detectron2


def _reference(valid_h, valid_w, num_feats=4, temperature=10000.0, offset=-0.5, eps=1e-6):
    """Element by element from the formula of SPEC §1.3, float64, unpadded (valid_h, valid_w) map."""
    out = torch.zeros(2 * num_feats, valid_h, valid_w, dtype=torch.float64)
    for i in range(valid_h):
        for j in range(valid_w):
            y = (i + 1 + offset) / (valid_h + eps) * 2 * math.pi
            x = (j + 1 + offset) / (valid_w + eps) * 2 * math.pi
            for c in range(num_feats):
                freq = temperature ** (2 * (c // 2) / num_feats)
                fn = math.sin if c % 2 == 0 else math.cos
                out[c, i, j] = fn(y / freq)
                out[num_feats + c, i, j] = fn(x / freq)
    return out


def test_values_match_formula():
    from panoptic_segformer.modeling.position_encoding import PositionEmbeddingSine

    pe = PositionEmbeddingSine(num_pos_feats=4)
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    out = pe(mask)
    assert out.shape == (1, 8, 3, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out[0].double(), _reference(3, 5), atol=1e-6, rtol=0)


def test_default_channels_and_layout():
    from panoptic_segformer.modeling.position_encoding import PositionEmbeddingSine

    out = PositionEmbeddingSine()(torch.zeros(2, 4, 6, dtype=torch.bool))
    assert out.shape == (2, 256, 4, 6)
    # first half depends only on the row, second half only on the column
    assert torch.equal(out[:, :128], out[:, :128, :, :1].expand(-1, -1, -1, 6))
    assert torch.equal(out[:, 128:], out[:, 128:, :1, :].expand(-1, -1, 4, -1))
    # channel 0 = sin, channel 1 = cos of the same (lowest-frequency = first pair) argument
    torch.testing.assert_close(out[:, 0] ** 2 + out[:, 1] ** 2, torch.ones(2, 4, 6))


def test_padding_invariance():
    from panoptic_segformer.modeling.position_encoding import PositionEmbeddingSine

    pe = PositionEmbeddingSine(num_pos_feats=16)
    mask = torch.ones(2, 7, 9, dtype=torch.bool)
    mask[0, :3, :5] = False
    mask[1, :7, :4] = False
    out = pe(mask)
    torch.testing.assert_close(out[0, :, :3, :5], pe(torch.zeros(1, 3, 5, dtype=torch.bool))[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1, :, :7, :4], pe(torch.zeros(1, 7, 4, dtype=torch.bool))[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, :, :3, :5].double(), _reference(3, 5, 16), atol=1e-5, rtol=0)


def test_bad_input():
    from panoptic_segformer.modeling.position_encoding import PositionEmbeddingSine

    pe = PositionEmbeddingSine()
    with pytest.raises(ValueError, match="bool"):
        pe(torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="B, H, W"):
        pe(torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="even"):
        PositionEmbeddingSine(num_pos_feats=3)


def test_from_config():
    from detectron2.config import get_cfg

    from panoptic_segformer.config import add_panoptic_segformer_config
    from panoptic_segformer.modeling.position_encoding import PositionEmbeddingSine

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM = 64
    assert PositionEmbeddingSine(cfg).num_pos_feats == 32
