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
