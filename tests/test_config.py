"""``get_panoptic_segformer_cfg``: the one config builder of the demo and the benchmark."""
import logging

from conftest import requires_detectron2

pytestmark = requires_detectron2


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_get_panoptic_segformer_cfg(tmp_path, monkeypatch):
    from panoptic_segformer import config

    path = tmp_path / "c.yaml"
    path.write_text("MODEL:\n  DEVICE: cuda:1\n  PANOPTIC_SEGFORMER:\n    NUM_QUERIES: 50\n")
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: False)
    records = _Records()
    logging.getLogger("panoptic_segformer.config").addHandler(records)
    try:
        cfg = config.get_panoptic_segformer_cfg(str(path), ["MODEL.PANOPTIC_SEGFORMER.NHEADS", "4"])
        # file then opts merged; a CUDA device falls back to the CPU, saying so
        assert cfg.MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES == 50 and cfg.MODEL.PANOPTIC_SEGFORMER.NHEADS == 4
        assert cfg.MODEL.DEVICE == "cpu"
        assert records.messages == ["MODEL.DEVICE is cuda:1 but CUDA is not available: running on the CPU"]
        assert not cfg.is_frozen()
        # an explicit device wins, without a warning
        assert config.get_panoptic_segformer_cfg(str(path), device="cuda:0").MODEL.DEVICE == "cuda:0"
        assert len(records.messages) == 1
        monkeypatch.setattr(config.torch.cuda, "is_available", lambda: True)
        assert config.get_panoptic_segformer_cfg(str(path)).MODEL.DEVICE == "cuda:1"
    finally:
        logging.getLogger("panoptic_segformer.config").removeHandler(records)


def test_invalid_model_sizes_name_the_key():
    import pytest
    from conftest import REPO_ROOT
    from detectron2.modeling import build_model

    import panoptic_segformer.data  # noqa: F401  (registers the toy dataset of quickstart.yaml)
    from panoptic_segformer import get_panoptic_segformer_cfg
    from panoptic_segformer.config import check_panoptic_segformer_config

    quickstart = str(REPO_ROOT / "configs" / "quickstart.yaml")
    check_panoptic_segformer_config(get_panoptic_segformer_cfg(quickstart))  # the shipped config is valid
    cases = [
        ("NUM_QUERIES", "-3", "NUM_QUERIES = -3: must be an int >= 1"),
        ("DEC_LAYERS", "0", "DEC_LAYERS = 0: must be an int >= 1"),
        ("DIM_FEEDFORWARD", "-5", "DIM_FEEDFORWARD = -5"),
        ("ENC_LAYERS", "-1", "ENC_LAYERS = -1"),
        ("STUFF_MASK_DECODER_LAYERS", "0", "STUFF_MASK_DECODER_LAYERS = 0"),
        ("MASK_DECODER_MLP_RATIO", "0", "MASK_DECODER_MLP_RATIO = 0"),
        ("NHEADS", "3", "NHEADS = 3: must divide HIDDEN_DIM = 64"),
        ("HIDDEN_DIM", "65", "HIDDEN_DIM = 65: must be even"),
        ("NUM_FEATURE_LEVELS", "2", "NUM_FEATURE_LEVELS = 2: must be >= the 3 IN_FEATURES"),
        ("DROPOUT", "1.5", r"DROPOUT = 1.5: must be in \[0, 1\)"),
        ("TEST.NUM_THING_CANDIDATES", "0", "NUM_THING_CANDIDATES = 0"),
    ]
    for key, value, message in cases:
        cfg = get_panoptic_segformer_cfg(quickstart, [f"MODEL.PANOPTIC_SEGFORMER.{key}", value], device="cpu")
        with pytest.raises(ValueError, match=message):
            build_model(cfg)
