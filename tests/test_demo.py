"""Tests of demo/demo.py: input expansion, output naming, error reporting and exit codes (stub
model), then the real model on the COCO panoptic sample."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import COCO_SAMPLE, REPO_ROOT, requires_coco_sample

pytest.importorskip(
    "detectron2", reason="detectron2 not installed (install it from its official source)"
)
cv2 = pytest.importorskip("cv2")

from test_predictor import ListHandler, StubPanopticModel  # noqa: E402,F401  (registers the stub)

_spec = importlib.util.spec_from_file_location("psf_demo", REPO_ROOT / "demo" / "demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

STUB_CONFIG = """
MODEL:
  META_ARCHITECTURE: "StubPanopticModel"
  DEVICE: "cpu"
  WEIGHTS: ""
INPUT:
  FORMAT: "RGB"
  MIN_SIZE_TEST: 32
  MAX_SIZE_TEST: 1000
DATASETS:
  TRAIN: ("coco_2017_train_panoptic",)
  TEST: ("coco_2017_val_panoptic",)
"""


@pytest.fixture
def stub_config(tmp_path):
    path = tmp_path / "stub.yaml"
    path.write_text(STUB_CONFIG)
    return str(path)


def write_image(path, h, w, seed=0):
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)
    return str(path)


def image_size(path):
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not a readable image"
    return image.shape[:2]


def run_demo(argv):
    """demo.main in-process; returns (exit code, messages of the demo logger)."""
    with ListHandler("panoptic_segformer.demo") as log:
        code = demo.main(argv)
    return code, log.messages


# --------------------------------------------------------------------------- inputs and outputs


def test_expand_inputs_files_globs_folders(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ["b.png", "a.jpg", "sub/c.jpg"]:
        write_image(folder / name, 8, 8)
    (folder / "notes.txt").write_text("not an image")
    paths, missing = demo.expand_inputs(
        [
            str(folder),
            str(folder / "*.png"),
            str(tmp_path / "missing.jpg"),
            str(folder / "a.jpg"),
            str(tmp_path / "*.none"),
        ]
    )
    assert paths == [
        str(folder / "a.jpg"),
        str(folder / "b.png"),
    ]  # folder sorted, no repeats, not recursive
    assert missing == [str(tmp_path / "missing.jpg"), str(tmp_path / "*.none")]


def test_output_paths(tmp_path):
    out = str(tmp_path / "out")
    # a folder: basenames kept, same names from different folders made unique, odd extensions -> .png
    targets = demo.output_paths(["x/img.jpg", "y/img.jpg", "z/anim.gif"], out, ["panoptic"])
    assert targets == [
        {"panoptic": os.path.join(out, "img.jpg")},
        {"panoptic": os.path.join(out, "img_1.jpg")},
        {"panoptic": os.path.join(out, "anim.png")},
    ]
    # several views: one file per view
    targets = demo.output_paths(["x/img.jpg"], out, ["panoptic", "semantic"])
    assert targets == [{v: os.path.join(out, f"img_{v}.jpg") for v in ("panoptic", "semantic")}]
    # a single input may go to a file
    assert demo.output_paths(["x/img.jpg"], str(tmp_path / "r.png"), ["panoptic"]) == [
        {"panoptic": str(tmp_path / "r.png")}
    ]
    assert demo.output_paths(["x/img.jpg"], str(tmp_path / "r.png"), ["panoptic", "instance"]) == [
        {"panoptic": str(tmp_path / "r_panoptic.png"), "instance": str(tmp_path / "r_instance.png")}
    ]
    # an existing folder named like a file stays a folder
    (tmp_path / "dir.png").mkdir()
    assert demo.output_paths(["x/img.jpg"], str(tmp_path / "dir.png"), ["panoptic"]) == [
        {"panoptic": os.path.join(str(tmp_path / "dir.png"), "img.jpg")}
    ]
    with pytest.raises(demo.UsageError, match="extension"):
        demo.output_paths(["x/img.jpg"], str(tmp_path / "r.txt"), ["panoptic"])
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(demo.UsageError, match="2 inputs need a folder"):
        demo.output_paths(["a.jpg", "b.jpg"], str(tmp_path / "file.png"), ["panoptic"])


def test_confidence_threshold_sets_merging_thresholds(stub_config):
    args = demo.get_parser().parse_args(
        [
            "--config-file",
            stub_config,
            "--input",
            "x.jpg",
            "--confidence-threshold",
            "0.6",
            "--device",
            "cpu",
        ]
    )
    test = demo.setup_cfg(args).MODEL.PANOPTIC_SEGFORMER.TEST
    assert test.THING_SCORE_THRESH == 0.6 and test.STUFF_SCORE_THRESH == 0.6
    args = demo.get_parser().parse_args(
        ["--config-file", stub_config, "--input", "x.jpg", "--view", "semantic"]
    )
    test = demo.setup_cfg(args).MODEL.PANOPTIC_SEGFORMER.TEST
    assert test.THING_SCORE_THRESH == 0.25  # the config's value is kept
    assert test.SEMANTIC_ON and not test.INSTANCE_ON
    # --opts come last and are applied
    args = demo.get_parser().parse_args(
        ["--config-file", stub_config, "--input", "x.jpg", "--opts", "INPUT.MIN_SIZE_TEST", "64"]
    )
    assert demo.setup_cfg(args).INPUT.MIN_SIZE_TEST == 64


# --------------------------------------------------------------------------- runs with the stub model


def test_bad_files_are_named_and_skipped(stub_config, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = [write_image(src / "a.jpg", 40, 60), write_image(src / "c.png", 50, 30, seed=1)]
    (src / "b_garbage.jpg").write_bytes(b"this is not an image")
    (src / "d_truncated.jpg").write_bytes(open(good[0], "rb").read()[:300])
    out = tmp_path / "out"
    code, log = run_demo(
        [
            "--config-file",
            stub_config,
            "--input",
            str(src),
            "--output",
            str(out),
            "--batch-size",
            "2",
        ]
    )
    assert code == 1
    assert sorted(os.listdir(out)) == ["a.jpg", "c.png"]
    assert image_size(out / "a.jpg") == (40, 60)
    assert image_size(out / "c.png") == (50, 30)
    errors = "\n".join(log)
    assert "b_garbage.jpg" in errors and "d_truncated.jpg" in errors
    assert "a.jpg: 2 segments" in errors  # the good ones are logged with their segment count


def test_all_good_exit_zero_and_drawing_is_not_the_input(stub_config, tmp_path):
    path = write_image(tmp_path / "a.png", 40, 60)
    code, _ = run_demo(
        ["--config-file", stub_config, "--input", path, "--output", str(tmp_path / "r.png")]
    )
    assert code == 0
    drawn = cv2.imread(str(tmp_path / "r.png"))
    assert drawn.shape == (40, 60, 3)
    assert (
        np.abs(drawn.astype(int) - cv2.imread(path).astype(int)).mean() > 5
    )  # segments were painted


def test_views_give_one_file_each(stub_config, tmp_path):
    path = write_image(tmp_path / "a.png", 40, 60)
    out = tmp_path / "out"
    code, _ = run_demo(
        [
            "--config-file",
            stub_config,
            "--input",
            path,
            "--output",
            str(out),
            "--view",
            "panoptic",
            "instance",
            "semantic",
        ]
    )
    assert code == 0
    assert sorted(os.listdir(out)) == ["a_instance.png", "a_panoptic.png", "a_semantic.png"]
    for name in os.listdir(out):
        assert image_size(out / name) == (40, 60)


def test_confidence_threshold_filters_the_instance_view(stub_config, tmp_path):
    path = write_image(tmp_path / "a.png", 40, 60)
    diffs = {}
    for threshold in ("0.25", "0.5"):  # the stub's only instance scores 0.3
        out = tmp_path / f"out_{threshold}.png"
        code, _ = run_demo(
            [
                "--config-file",
                stub_config,
                "--input",
                path,
                "--output",
                str(out),
                "--view",
                "instance",
                "--confidence-threshold",
                threshold,
            ]
        )
        assert code == 0
        diffs[threshold] = np.abs(
            cv2.imread(str(out)).astype(int) - cv2.imread(path).astype(int)
        ).mean()
    assert diffs["0.25"] > 5 and diffs["0.5"] < 1


def test_video_input(stub_config, tmp_path):
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (64, 48), True)
    assert writer.isOpened()
    for i in range(4):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    out = tmp_path / "out"
    code, _ = run_demo(
        [
            "--config-file",
            stub_config,
            "--video-input",
            video,
            "--output",
            str(out),
            "--batch-size",
            "3",
        ]
    )
    assert code == 0
    capture = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 4 and frames[0].shape == (48, 64, 3)


def test_usage_errors_and_exit_codes(stub_config, tmp_path):
    code, log = run_demo(
        [
            "--config-file",
            stub_config,
            "--input",
            str(tmp_path / "nothing*.jpg"),
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 2 and any("nothing*.jpg" in m for m in log)
    path = write_image(tmp_path / "a.png", 16, 16)
    code, log = run_demo(
        [
            "--config-file",
            stub_config,
            "--input",
            path,
            "--output",
            str(tmp_path),
            "--batch-size",
            "0",
        ]
    )
    assert code == 2 and any("--batch-size" in m for m in log)
    code, log = run_demo(
        [
            "--config-file",
            stub_config,
            "--video-input",
            str(tmp_path / "no.mp4"),
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 1 and any("no.mp4" in m for m in log)
    # a missing file among good ones: the good one is written, the run reports failure
    out = tmp_path / "out"
    code, log = run_demo(
        [
            "--config-file",
            stub_config,
            "--input",
            path,
            str(tmp_path / "gone.jpg"),
            "--output",
            str(out),
        ]
    )
    assert code == 1 and os.listdir(out) == ["a.png"] and any("gone.jpg" in m for m in log)
    with pytest.raises(
        SystemExit
    ):  # argparse: --input, --video-input and --webcam exclude each other
        demo.get_parser().parse_args(["--config-file", stub_config, "--input", path, "--webcam"])


# --------------------------------------------------------------------------- the real model

SMALL_MODEL_OPTS = [
    "MODEL.WEIGHTS",
    "",
    "MODEL.DEVICE",
    "cpu",
    "INPUT.MIN_SIZE_TEST",
    "160",
    "INPUT.MAX_SIZE_TEST",
    "256",
    "MODEL.PANOPTIC_SEGFORMER.ENC_LAYERS",
    "1",
    "MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS",
    "2",
    "MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES",
    "30",
    "MODEL.PANOPTIC_SEGFORMER.THING_MASK_DECODER_LAYERS",
    "1",
    "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_DECODER_LAYERS",
    "1",
    "MODEL.PANOPTIC_SEGFORMER.TEST.NUM_THING_CANDIDATES",
    "20",
]
R50 = str(REPO_ROOT / "configs" / "R50.yaml")


@requires_coco_sample
def test_cli_on_the_coco_sample(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "demo/demo.py",
            "--config-file",
            R50,
            "--input",
            str(COCO_SAMPLE / "images"),
            "--output",
            str(out),
            "--opts",
            *SMALL_MODEL_OPTS,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RANDOM" in proc.stdout + proc.stderr  # the random-weights warning
    inputs = sorted((COCO_SAMPLE / "images").glob("*.jpg"))
    assert sorted(os.listdir(out)) == [p.name for p in inputs]
    for p in inputs:
        assert image_size(out / p.name) == image_size(p)


@requires_coco_sample
def test_corrupt_file_among_real_images(tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes((COCO_SAMPLE / "images" / "000000142238.jpg").read_bytes()[:2000])
    inputs = sorted((COCO_SAMPLE / "images").glob("*.jpg"))
    out = tmp_path / "out"
    code, log = run_demo(
        [
            "--config-file",
            R50,
            "--input",
            str(inputs[0]),
            str(bad),
            str(inputs[1]),
            "--output",
            str(out),
            "--batch-size",
            "2",
            "--opts",
            *SMALL_MODEL_OPTS,
        ]
    )
    assert code == 1
    assert sorted(os.listdir(out)) == [p.name for p in inputs]
    for p in inputs:
        assert image_size(out / p.name) == image_size(p)
    assert any("corrupt.jpg" in m for m in log)


@requires_coco_sample
def test_confidence_threshold_reaches_the_merging():
    from panoptic_segformer.predictor import Predictor

    image = cv2.imread(str(COCO_SAMPLE / "images" / "000000439180.jpg"))
    counts = {}
    for threshold in ("0.0", "1.0"):  # scores p * q**2 are below 1: nothing passes 1.0
        args = demo.get_parser().parse_args(
            [
                "--config-file",
                R50,
                "--input",
                "x",
                "--confidence-threshold",
                threshold,
                "--opts",
                *SMALL_MODEL_OPTS,
            ]
        )
        predictor = Predictor(demo.setup_cfg(args))
        counts[threshold] = len(predictor(image)["panoptic_seg"][1])
    assert counts["0.0"] > 0 and counts["1.0"] == 0


def test_precision_compile_and_channels_last_options():
    """--precision sets TEST.PRECISION (the config's is the default) and reaches the model with
    --channels-last and --compile; an unknown precision is a usage error."""
    import torch

    from panoptic_segformer.compile import CompiledForward

    def parse(*extra):
        return demo.get_parser().parse_args(["--config-file", R50, "--input", "x", *extra, "--opts", *SMALL_MODEL_OPTS])

    assert demo.setup_cfg(parse()).MODEL.PANOPTIC_SEGFORMER.TEST.PRECISION == "fp32"
    args = parse("--precision", "bf16", "--channels-last", "--compile")
    cfg = demo.setup_cfg(args)
    assert cfg.MODEL.PANOPTIC_SEGFORMER.TEST.PRECISION == "bf16"
    model = demo.build_predictor(cfg, args).model
    assert model.precision == "bf16"
    assert model.backbone.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(model.backbone.forward, CompiledForward)
    with pytest.raises(SystemExit) as exit_info:
        parse("--precision", "int8")
    assert exit_info.value.code == 2


# --------------------------------------------------------------------------- bad inputs and frames


def test_an_image_that_breaks_the_model_is_named_and_the_others_are_written(tmp_path):
    """A readable 1x10000 strip shrinks to height 0 at the test scale: it fails in the model,
    alone, even inside a batch with good images."""
    src = tmp_path / "in"
    src.mkdir()
    write_image(src / "a.png", 60, 80)
    write_image(src / "b_strip.png", 1, 10000, seed=1)
    write_image(src / "c.png", 70, 50, seed=2)
    out = tmp_path / "out"
    code, log = run_demo(["--config-file", R50, "--input", str(src), "--output", str(out),
                          "--batch-size", "2", "--opts", *SMALL_MODEL_OPTS])
    assert code == 1
    assert sorted(os.listdir(out)) == ["a.png", "c.png"]
    assert image_size(out / "a.png") == (60, 80) and image_size(out / "c.png") == (70, 50)
    assert any("b_strip.png" in m and m.startswith("cannot") for m in log)


def test_a_drawing_failure_is_named_and_skipped(stub_config, tmp_path, monkeypatch):
    paths = [write_image(tmp_path / f"{n}.png", 20, 30, seed=i) for i, n in enumerate("abc")]
    original = demo.draw_image

    def draw(image, prediction, *args):
        if image.shape[0] == 21:
            raise ValueError("cannot draw this one")
        return original(image, prediction, *args)

    write_image(tmp_path / "b.png", 21, 30)
    monkeypatch.setattr(demo, "draw_image", draw)
    out = tmp_path / "out"
    code, log = run_demo(["--config-file", stub_config, "--input", *paths, "--output", str(out)])
    assert code == 1 and sorted(os.listdir(out)) == ["a.png", "c.png"]
    assert any("b.png" in m and "cannot draw this one" in m for m in log)


def _mjpg_with_a_corrupt_frame(path, num_frames=20, corrupt=8):
    """An MJPG AVI whose frame ``corrupt`` has its JPEG data replaced by noise; frame i is
    filled with the value 10 * i."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (64, 48), True)
    assert writer.isOpened()
    for i in range(num_frames):
        writer.write(np.full((48, 64, 3), 10 * i, np.uint8))
    writer.release()
    data = bytearray(path.read_bytes())
    jpegs = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    assert len(jpegs) == num_frames
    noise = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()
    data[jpegs[corrupt]:jpegs[corrupt] + len(noise)] = noise
    path.write_bytes(bytes(data))


def test_video_with_a_corrupt_frame_skips_it_counts_it_and_fails(stub_config, tmp_path):
    video = tmp_path / "clip.avi"
    _mjpg_with_a_corrupt_frame(video)
    capture = cv2.VideoCapture(str(video))
    assert [capture.read()[0] for _ in range(9)][-1] is False  # OpenCV cannot decode frame 8
    out = tmp_path / "out"
    code, log = run_demo(["--config-file", stub_config, "--video-input", str(video), "--output", str(out),
                          "--batch-size", "3"])
    capture = cv2.VideoCapture(str(out / "clip.mp4"))
    written = 0
    while capture.read()[0]:
        written += 1
    # OpenCV may lose the frame after the corrupt one too: the count is what is missing of 20
    assert code == 1 and 17 <= written <= 19  # the video goes on after the bad frame
    lost = 20 - written
    assert any(f"{lost} of 20 frames lost: {lost} could not be decoded" in m
               and f"{written} frames were written" in m for m in log)


def test_16_bit_pngs_are_scaled_to_8_bit(tmp_path):
    from panoptic_segformer.data.panoptic_dataset_mapper import read_image_file

    ramp = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
    gray, colour = tmp_path / "gray16.png", tmp_path / "colour16.png"
    assert cv2.imwrite(str(gray), ramp) and cv2.imwrite(str(colour), np.stack([ramp, ramp[::-1], 65535 - ramp], -1))
    expected = ramp / 257.0
    image = read_image_file(str(gray), "BGR")
    assert image.dtype == np.uint8 and image.shape == (32, 48, 3)
    assert np.abs(image.astype(float) - expected[..., None]).max() <= 0.5  # not saturated
    image = read_image_file(str(colour), "BGR")
    assert np.abs(image.astype(float) - np.stack([expected, expected[::-1], 255 - expected], -1)).max() <= 1


def test_large_inputs_are_drawn_at_the_bounded_size(stub_config, tmp_path):
    path = write_image(tmp_path / "big.png", 300, 500)
    out = tmp_path / "out.png"
    code, _ = run_demo(["--config-file", stub_config, "--input", path, "--output", str(out),
                        "--max-draw-size", "100"])
    assert code == 0 and image_size(out) == (60, 100)
    code, _ = run_demo(["--config-file", stub_config, "--input", path, "--output", str(out),
                        "--max-draw-size", "0"])
    assert code == 0 and image_size(out) == (300, 500)
    assert demo.get_parser().get_default("max_draw_size") == demo.DEFAULT_MAX_DRAW_SIZE > 0
    code, log = run_demo(["--config-file", stub_config, "--input", path, "--output", str(out),
                          "--max-draw-size", "-1"])
    assert code == 2 and any("--max-draw-size" in m for m in log)
