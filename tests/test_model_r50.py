"""The full-size R50 model: parameter count (SPEC §8.1) and CPU inference at 800x1333 drawn by
Detectron2's Visualizer with the COCO panoptic metadata."""
import torch

from conftest import REPO_ROOT, requires_detectron2

pytestmark = requires_detectron2

# SPEC §8.1, "Total without the two x0 branch sets" (deviation (a)), all parameters
R50_PARAMS = 50_659_212


def r50_cfg():
    from detectron2.config import get_cfg

    from panoptic_segformer import add_panoptic_segformer_config

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "R50.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def build_r50(cfg):
    import detectron2.data.datasets  # noqa: F401  (registers the COCO metadata)
    from detectron2.modeling import build_model

    import panoptic_segformer.modeling.meta_arch  # noqa: F401

    torch.manual_seed(0)
    return build_model(cfg)


def count_params(model):
    """Parameters plus the FrozenBatchNorm affine buffers (parameters in the official count)."""
    n = sum(p.numel() for p in model.parameters())
    return n + sum(b.numel() for name, b in model.named_buffers() if name.endswith((".weight", ".bias")))


def test_r50_parameter_count():
    model = build_r50(r50_cfg())
    assert model.head.num_thing_classes == 80 and model.head.num_stuff_classes == 53  # from metadata
    n = count_params(model)
    assert n == R50_PARAMS, n  # the issue asks for 0.5%; the count is exact


def test_r50_inference_800x1333_draws_with_visualizer():
    from detectron2.data import MetadataCatalog
    from detectron2.utils.visualizer import Visualizer

    from panoptic_segformer.layers import MSDeformAttn, compiled_available

    cfg = r50_cfg()
    cfg.MODEL.PANOPTIC_SEGFORMER.TEST.NUM_THING_CANDIDATES = 20  # bounds the merging memory
    model = build_r50(cfg).eval()
    # random weights: let low-score candidates through so the drawing has segments
    model.merge_kwargs.update(thing_score_thresh=0.0, stuff_score_thresh=0.0)
    backend = "compiled" if compiled_available("cpu") else "pytorch"
    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            m.backend = backend  # "compiled" raises if the kernel did not run
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 800, 1333), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 400, "width": 666}])
    pan, segments = out["panoptic_seg"]
    assert pan.shape == (400, 666) and pan.dtype == torch.int32
    assert len(segments) > 0 and set(torch.unique(pan).tolist()) - {0} == {s["id"] for s in segments}
    meta = MetadataCatalog.get("coco_2017_val_panoptic")
    vis = Visualizer(image.permute(1, 2, 0).numpy()[::2, ::2][:400, :666], meta).draw_panoptic_seg(pan, segments)
    drawn = vis.get_image()
    assert drawn.shape == (400, 666, 3) and drawn.std() > 0
