"""Export (issue 12): every format against eager PyTorch on a briefly trained quickstart model.

The model is the quickstart recipe trained for a few iterations on the toy data (train_net.py),
so that its scores and masks are structured enough for things and stuff to pass the merging,
as with the README's quickstart weights. Each format is exported once, with dynamic batch and
size, and then run at two input sizes and at batch sizes 1 and 2.

Tolerances: torch.export and ONNX Runtime / AOTInductor run the same float32 arithmetic in a
different order (fused or reordered kernels), so raw masks and scores may differ by float32
rounding amplified through the layers: we allow 1e-3 absolute on masks (values of order 1,
threshold 0.5) and 1e-4 on scores (probabilities). The panoptic result after merging must be
identical: the same id map pixel for pixel and the same segments (category, kind, area).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import COCO_SAMPLE, REPO_ROOT, requires_coco_sample, requires_detectron2

pytestmark = requires_detectron2

CONFIG = str(REPO_ROOT / "configs" / "quickstart.yaml")
TRAIN_ITERS = 120
MASK_ATOL, SCORE_ATOL = 1e-3, 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(eager model in eval mode, Predictor, training output folder) of a briefly trained quickstart."""
    from detectron2.modeling import build_model

    from panoptic_segformer.config import get_panoptic_segformer_cfg
    from panoptic_segformer.predictor import Predictor

    out = tmp_path_factory.mktemp("quickstart")
    cmd = [sys.executable, str(REPO_ROOT / "train_net.py"), "--config-file", CONFIG,
           "SOLVER.MAX_ITER", str(TRAIN_ITERS), "SOLVER.STEPS", "()", "TEST.EVAL_PERIOD", "0",
           "TEST.LEARNING_CURVE", "", "SOLVER.CHECKPOINT_PERIOD", "100000", "OUTPUT_DIR", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = get_panoptic_segformer_cfg(CONFIG, ["MODEL.WEIGHTS", str(out / "model_final.pth")], device="cpu")
    predictor = Predictor(cfg)
    return predictor.model, predictor, out


_exports = {}


def _export(fmt, trained, tmp_path_factory):
    if fmt not in _exports:
        from panoptic_segformer.export import export_model

        model, predictor, _ = trained
        folder = tmp_path_factory.mktemp(f"export_{fmt}")
        export_model(model, fmt, str(folder), metadata=predictor.metadata, min_size_test=128, max_size_test=256)
        _exports[fmt] = str(folder)
    return _exports[fmt]


def _toy_images(n=4):
    from detectron2.data import DatasetCatalog

    from panoptic_segformer.data.panoptic_dataset_mapper import read_image_file

    return [read_image_file(r["file_name"], "BGR") for r in DatasetCatalog.get("toy_panoptic_val")[:n]]


def _assert_same_panoptic(eager, exported, what):
    (ids_a, info_a), (ids_b, info_b) = eager["panoptic_seg"], exported["panoptic_seg"]
    assert torch.equal(ids_a.cpu(), ids_b.cpu()), f"{what}: id maps differ in {(ids_a != ids_b).sum()} pixels"
    key = lambda s: (s["id"], s["category_id"], s["isthing"], s.get("area"))  # noqa: E731
    assert [key(s) for s in info_a] == [key(s) for s in info_b], what
    assert np.allclose([s["score"] for s in info_a], [s["score"] for s in info_b], atol=SCORE_ATOL), what


def _run_both(trained, folder, images, min_size, batch_size):
    from panoptic_segformer.export import ExportedModel
    from panoptic_segformer.predictor import Predictor

    model, predictor, _ = trained
    exported = ExportedModel(folder)
    kwargs = dict(metadata=predictor.metadata, min_size_test=min_size, max_size_test=256, batch_size=batch_size)
    eager = Predictor(model=model, **kwargs)(images)
    return eager, Predictor(model=exported, **kwargs)(images)


@pytest.mark.parametrize("fmt", ["torch_export", "onnx", "aoti"])
def test_export_gives_the_eager_panoptic_result_at_two_sizes_and_batch_sizes(fmt, trained, tmp_path_factory):
    folder = _export(fmt, trained, tmp_path_factory)
    images = _toy_images()
    n_segments = 0
    for min_size in (128, 160):  # padded sizes 128x160 .. 160x224: no re-export
        for batch_size in (1, 2):
            eager, got = _run_both(trained, folder, images, min_size, batch_size)
            for i, (a, b) in enumerate(zip(eager, got)):
                _assert_same_panoptic(a, b, f"{fmt} size {min_size} batch {batch_size} image {i}")
                n_segments += len(a["panoptic_seg"][1])
    # the comparison covers things and stuff (a trained model, not an empty result)
    kinds = {s["isthing"] for out in eager for s in out["panoptic_seg"][1]}
    assert n_segments > 0 and kinds == {True, False}


@pytest.mark.parametrize("fmt", ["torch_export", "onnx", "aoti"])
def test_exported_candidates_match_eager_within_tolerance(fmt, trained, tmp_path_factory):
    from panoptic_segformer.export import OUTPUT_NAMES, ExportableNetwork, ExportedModel
    from panoptic_segformer.export.runtime import normalise_and_pad

    model, predictor, _ = trained
    exported = ExportedModel(_export(fmt, trained, tmp_path_factory))
    inputs = [predictor._preprocess(img, 0, "BGR") for img in _toy_images(2)]
    for batch in ([inputs[0]], inputs):  # batch sizes 1 and 2 (one padded size)
        images = [x["image"] for x in batch]
        got, sizes = exported.run_network(images)
        # eager on the identical padded input
        x, _ = normalise_and_pad(images, model.pixel_mean, model._pixel_inv_std, model.size_divisibility)
        with torch.no_grad():
            ref = dict(zip(OUTPUT_NAMES, ExportableNetwork(model)(x, sizes)))
        for name in OUTPUT_NAMES:
            assert got[name].shape == ref[name].shape, name
        assert torch.equal(got["thing_labels"], ref["thing_labels"])
        torch.testing.assert_close(got["thing_masks"], ref["thing_masks"], atol=MASK_ATOL, rtol=0)
        torch.testing.assert_close(got["stuff_masks"], ref["stuff_masks"], atol=MASK_ATOL, rtol=0)
        for name in ("thing_scores", "stuff_scores", "thing_boxes"):
            torch.testing.assert_close(got[name], ref[name], atol=SCORE_ATOL, rtol=0)


@requires_coco_sample
@pytest.mark.parametrize("fmt", ["torch_export", "onnx", "aoti"])
def test_export_gives_the_eager_segments_on_the_coco_sample_images(fmt, trained, tmp_path_factory):
    from panoptic_segformer.data.panoptic_dataset_mapper import read_image_file

    images = [read_image_file(str(p), "BGR") for p in sorted((COCO_SAMPLE / "images").glob("*.jpg"))]
    assert len(images) == 2
    eager, got = _run_both(trained, _export(fmt, trained, tmp_path_factory), images, 128, 2)
    for i, (a, b) in enumerate(zip(eager, got)):
        assert a["panoptic_seg"][0].shape == images[i].shape[:2]
        _assert_same_panoptic(a, b, f"{fmt} COCO image {i}")
    assert sum(len(out["panoptic_seg"][1]) for out in eager) > 0


def test_torch_export_runs_without_detectron2(trained, tmp_path_factory):
    folder = _export("torch_export", trained, tmp_path_factory)
    code = (
        "import sys; sys.modules['detectron2'] = None\n"
        "import torch, panoptic_segformer.layers\n"
        f"net = torch.export.load({os.path.join(folder, 'model.pt2')!r}).module()\n"
        "x = torch.zeros(2, 3, 96, 128); sizes = torch.tensor([[96, 128], [80, 100]])\n"
        "out = net(x, sizes)\n"
        "assert 'detectron2' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
        "print(tuple(out[0].shape), tuple(out[4].shape))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = trained[0]
    k = min(model.num_thing_candidates, model.head.location_decoder.num_queries * model.head.num_thing_classes)
    assert proc.stdout.split("\n")[-2] == f"(2, {k}, 12, 16) (2, {model.head.num_stuff_classes}, 12, 16)"


def test_demo_draws_an_exported_model(trained, tmp_path_factory, tmp_path):
    from detectron2.data import DatasetCatalog

    folder = _export("onnx", trained, tmp_path_factory)
    image = DatasetCatalog.get("toy_panoptic_val")[0]["file_name"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    demo = [sys.executable, str(REPO_ROOT / "demo" / "demo.py"), "--exported", folder, "--input", image]
    proc = subprocess.run(demo + ["--output", str(tmp_path / "out.png")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import cv2

    drawing = cv2.imread(str(tmp_path / "out.png"))
    assert drawing is not None and drawing.shape == cv2.imread(image).shape
    assert not np.array_equal(drawing, cv2.imread(image))  # something was drawn
    bad = subprocess.run(demo + ["--view", "instance", "--output", str(tmp_path / "x.png")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "panoptic view only" in bad.stdout + bad.stderr


def test_export_refuses_what_it_cannot_export(trained):
    import copy

    from panoptic_segformer.export import ExportableNetwork, export_model

    model = trained[0]
    with pytest.raises(TypeError, match="PanopticSegFormer"):
        ExportableNetwork(torch.nn.Linear(2, 2))
    compat = copy.copy(model)
    compat.official_compat = True
    with pytest.raises(ValueError, match="OFFICIAL_COMPAT"):
        ExportableNetwork(compat)
    bf16 = copy.copy(model)
    bf16.precision = "bf16"
    with pytest.raises(ValueError, match="float32"):
        ExportableNetwork(bf16)
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(model, "tflite", "/nonexistent")


def test_exported_model_names_a_missing_or_foreign_export(tmp_path):
    from panoptic_segformer.export import ExportedModel

    with pytest.raises(FileNotFoundError, match="export_meta.json"):
        ExportedModel(str(tmp_path))
    (tmp_path / "export_meta.json").write_text('{"format": "onnx", "file": "model.onnx"}')
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        ExportedModel(str(tmp_path))
    (tmp_path / "export_meta.json").write_text('{"format": "tflite", "file": "m"}')
    with pytest.raises(ValueError, match="unknown format 'tflite'"):
        ExportedModel(str(tmp_path))
