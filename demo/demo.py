#!/usr/bin/env python
"""Panoptic SegFormer demo: draw predictions on images, a video or a webcam stream.

    python demo/demo.py --config-file configs/R50.yaml --input img.jpg --output out.png \
        --opts MODEL.WEIGHTS model_final.pth
    python demo/demo.py --exported export_dir --input img.jpg --output out.png   # tools/export_model.py

``--input`` takes files, glob patterns (quote them) and folders (their images, not recursive).
An input that cannot be read, predicted, drawn or written is reported by name and skipped; the
run goes on. Video frames that cannot be decoded are skipped and counted. Inputs larger than
``--max-draw-size`` are shrunk to it before prediction and drawing (bounded memory).

Exit status: 0 when every input (every video frame) was processed, 1 when some input or frame
failed, 2 on a usage error (bad arguments, no input found, no display to show results on).
"""

import argparse
import glob
import importlib.util
import logging
import os
import sys
import time

import cv2
import numpy as np
import tqdm

if importlib.util.find_spec("panoptic_segformer") is None:  # run from a checkout, not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.video_visualizer import VideoVisualizer  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402

from panoptic_segformer.config import get_panoptic_segformer_cfg  # noqa: E402
from panoptic_segformer.data.panoptic_dataset_mapper import read_image_file  # noqa: E402
from panoptic_segformer.modeling.precision import PRECISIONS  # noqa: E402
from panoptic_segformer.predictor import Predictor  # noqa: E402
from panoptic_segformer.robust_inference import (  # noqa: E402
    VideoFrames,
    fit_size,
    fit_within,
    predict_each,
)

DEFAULT_MAX_DRAW_SIZE = 1333  # the longer side of the default test scale: masks have no finer detail
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIEWS = ("panoptic", "instance", "semantic")
WINDOW_NAME = "Panoptic SegFormer"

logger = logging.getLogger("panoptic_segformer.demo")


class UsageError(Exception):
    """Bad arguments: reported without a traceback, exit status 2."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Panoptic SegFormer demo")
    parser.add_argument(
        "--config-file", metavar="FILE", help="path to a config file (required unless --exported)"
    )
    parser.add_argument(
        "--exported",
        metavar="PATH",
        help="run an exported model instead (a folder or model file written by tools/export_model.py; "
        "panoptic view only; the export's own test resize and thresholds apply)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, glob patterns or folders")
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    source.add_argument("--webcam", action="store_true", help="read frames from webcam 0")
    parser.add_argument(
        "--output",
        help="folder (or file, for a single input or a video) to write the drawings to; "
        "without it they are shown in a window",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=None,
        help="minimum segment score (p * q^2) kept by the mask-wise merging, for things and "
        "stuff; default: the config's MODEL.PANOPTIC_SEGFORMER.TEST.{THING,STUFF}_SCORE_THRESH",
    )
    parser.add_argument(
        "--view",
        nargs="+",
        choices=VIEWS,
        default=["panoptic"],
        help="what to draw; with several views each input gives one file per view (_<view> suffix)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument(
        "--max-draw-size",
        type=int,
        default=DEFAULT_MAX_DRAW_SIZE,
        metavar="PIXELS",
        help="inputs (images, video frames) whose longer side exceeds this are shrunk to it before "
        "prediction and drawing, which bounds memory (the model sees every input at the test "
        f"scale anyway); 0 = never shrink (default: {DEFAULT_MAX_DRAW_SIZE})",
    )
    parser.add_argument(
        "--device",
        help="cpu, cuda, cuda:1, ... (default: the config's MODEL.DEVICE, or the CPU when it names "
        "CUDA and no GPU is available)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="autocast dtype of the network: bf16 on CPUs with AVX512-BF16/AMX and on GPUs, fp16 "
        "on GPUs (default: the config's MODEL.PANOPTIC_SEGFORMER.TEST.PRECISION, fp32)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network stages (the first image of each new size compiles, "
        "minutes on a CPU; stages that cannot compile run eagerly)",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="backbone convolutions in channels-last layout (faster with bf16 on CPU)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow MODEL.WEIGHTS files that need full unpickling (.pkl, custom objects); "
        "only for files from a trusted source",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth (must come last)",
    )
    return parser


def setup_cfg(args):
    cfg = get_panoptic_segformer_cfg(args.config_file, args.opts, args.device)
    test = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
    if args.confidence_threshold is not None:
        test.THING_SCORE_THRESH = args.confidence_threshold
        test.STUFF_SCORE_THRESH = args.confidence_threshold
    test.PANOPTIC_ON = test.PANOPTIC_ON or "panoptic" in args.view
    test.INSTANCE_ON = test.INSTANCE_ON or "instance" in args.view
    test.SEMANTIC_ON = test.SEMANTIC_ON or "semantic" in args.view
    if args.precision:
        test.PRECISION = args.precision
    cfg.freeze()
    return cfg


def build_predictor(cfg, args) -> Predictor:
    return Predictor(
        cfg,
        batch_size=args.batch_size,
        trust_checkpoint=args.trust_checkpoint,
        compile=args.compile,
        channels_last=args.channels_last,
    )


def build_exported_predictor(args) -> Predictor:
    """A Predictor around an exported network (``--exported``): merging and drawing as the eager demo."""
    from panoptic_segformer.export import ExportedModel

    if args.view != ["panoptic"]:
        raise UsageError("--exported models give the panoptic view only")
    ignored = [f for f, on in (("--config-file", args.config_file), ("--opts", args.opts),
                               ("--precision", args.precision), ("--compile", args.compile),
                               ("--channels-last", args.channels_last)) if on]
    if ignored:
        raise UsageError(f"{', '.join(ignored)} cannot be used with --exported (the export fixes them)")
    try:
        model = ExportedModel(args.exported, device=args.device or "cpu")
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--exported {args.exported}: {e}") from e
    if args.confidence_threshold is not None:
        model.meta["merge"].update(
            thing_score_thresh=args.confidence_threshold, stuff_score_thresh=args.confidence_threshold
        )
    meta = model.meta
    logger.info(f"exported model: {model.file} ({meta['format']})")
    return Predictor(
        model=model,
        metadata=model.metadata(),
        min_size_test=meta["min_size_test"],
        max_size_test=meta["max_size_test"],
        model_input_format=meta["input_format"],
        batch_size=args.batch_size,
    )


def make_predictor(args):
    """(predictor, instance score threshold) from --exported or from --config-file."""
    if args.exported:
        predictor = build_exported_predictor(args)
        return predictor, predictor.model.meta["merge"]["thing_score_thresh"]
    if not args.config_file:
        raise UsageError("--config-file is required (or --exported)")
    cfg = setup_cfg(args)
    return build_predictor(cfg, args), instance_score_thresh(cfg)


def instance_score_thresh(cfg) -> float:
    """Minimum score of the instances drawn by the instance view: the thing merging threshold."""
    return cfg.MODEL.PANOPTIC_SEGFORMER.TEST.THING_SCORE_THRESH


def expand_inputs(patterns):
    """Files of ``patterns`` (files, globs, folders) in order, without repeats.

    Returns (paths, missing): ``missing`` lists the patterns that name nothing.
    """
    paths, missing, seen = [], [], set()
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f)
                for f in os.listdir(pattern)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(pattern, f))
            )
        elif glob.has_magic(pattern):
            found = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
        else:
            found = [pattern] if os.path.exists(pattern) else []
        if not found:
            missing.append(pattern)
        for f in found:
            if f not in seen:
                seen.add(f)
                paths.append(f)
    return paths, missing


def output_paths(inputs, output, views):
    """For each input, {view: path to write}. ``output`` is a folder, or a file for one input."""
    as_file = len(inputs) == 1 and os.path.splitext(output)[1] != "" and not os.path.isdir(output)
    if as_file:
        if not output.lower().endswith(IMAGE_EXTENSIONS):
            raise UsageError(
                f"--output {output}: unsupported image extension ({', '.join(IMAGE_EXTENSIONS)})"
            )
        stem, ext = os.path.splitext(output)
        if len(views) == 1:
            return [{views[0]: output}]
        return [{v: f"{stem}_{v}{ext}" for v in views}]
    if os.path.isfile(output):
        raise UsageError(f"--output {output} is a file, but {len(inputs)} inputs need a folder")
    used, result = set(), []
    for path in inputs:
        stem, ext = os.path.splitext(os.path.basename(path))
        ext = ext if ext.lower() in IMAGE_EXTENSIONS else ".png"
        name, k = stem, 1
        while name in used:  # same file name in different input folders
            name, k = f"{stem}_{k}", k + 1
        used.add(name)
        suffix = (lambda v: "") if len(views) == 1 else (lambda v: f"_{v}")
        result.append({v: os.path.join(output, f"{name}{suffix(v)}{ext}") for v in views})
    return result


OUTPUT_KEYS = {"panoptic": "panoptic_seg", "instance": "instances", "semantic": "sem_seg"}


def _view_output(prediction, view):
    key = OUTPUT_KEYS[view]
    if key not in prediction:
        raise KeyError(f"the model returned no '{key}' for the {view} view")
    return prediction[key]


def draw_image(image_bgr, prediction, view, metadata, score_thresh) -> np.ndarray:
    """Draw one view of a prediction over an image with Detectron2's Visualizer; returns BGR.

    The instance view draws the instances scoring at least ``score_thresh``.
    """
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
    output = _view_output(prediction, view)
    if view == "panoptic":
        vis = visualizer.draw_panoptic_seg(output[0].cpu(), output[1])
    elif view == "instance":
        vis = visualizer.draw_instance_predictions(output[output.scores >= score_thresh].to("cpu"))
    else:
        vis = visualizer.draw_sem_seg(output.argmax(dim=0).cpu())
    return vis.get_image()[:, :, ::-1]


def draw_frame(visualizer, frame_bgr, prediction, view, score_thresh) -> np.ndarray:
    """Like ``draw_image`` for a video frame, with a VideoVisualizer (colours kept over time)."""
    frame = frame_bgr[:, :, ::-1]
    output = _view_output(prediction, view)
    if view == "panoptic":
        vis = visualizer.draw_panoptic_seg_predictions(frame, output[0].cpu(), output[1])
    elif view == "instance":
        vis = visualizer.draw_instance_predictions(
            frame, output[output.scores >= score_thresh].to("cpu")
        )
    else:
        vis = visualizer.draw_sem_seg(frame, output.argmax(dim=0).cpu())
    return np.ascontiguousarray(vis.get_image()[:, :, ::-1])


def show(window, image_bgr, wait_ms) -> bool:
    """Show an image; returns False when the user pressed ESC."""
    try:
        cv2.namedWindow(window, cv2.WINDOW_NORMAL)
        cv2.imshow(window, image_bgr)
        return cv2.waitKey(wait_ms) != 27
    except cv2.error as e:
        raise UsageError(f"cannot open a window to show results ({e}); pass --output") from e


def close_windows():
    try:
        cv2.destroyAllWindows()
    except cv2.error:  # OpenCV without GUI support: no window was opened
        pass


def run_on_images(predictor, paths, args, score_thresh) -> list:
    """Predict, draw and write/show every image; returns the paths that failed."""
    targets = output_paths(paths, args.output, args.view) if args.output else None
    for folder in {
        os.path.dirname(os.path.abspath(f)) for target in targets or [] for f in target.values()
    }:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the output folder {folder}: {e}") from e
    failed = []
    progress = tqdm.tqdm(total=len(paths), unit="img", disable=args.output is None)

    def fail(path, what, error):
        logger.error(f"cannot {what} {path}: {type(error).__name__}: {error}")
        if path not in failed:
            failed.append(path)

    def flush(batch):
        start = time.perf_counter()
        predictions = predict_each(predictor, [img for _, _, img in batch])
        elapsed = (time.perf_counter() - start) / len(batch)
        for (index, path, image), prediction in zip(batch, predictions):
            progress.update(1)
            if isinstance(prediction, Exception):
                fail(path, "predict", prediction)
                continue
            n = len(prediction["panoptic_seg"][1]) if "panoptic_seg" in prediction else 0
            logger.info(f"{path}: {n} segments in {elapsed:.2f}s")
            for view in args.view:
                try:
                    drawing = draw_image(image, prediction, view, predictor.metadata, score_thresh)
                except Exception as e:  # e.g. an extreme aspect ratio in the Visualizer
                    fail(path, f"draw the {view} view of", e)
                    continue
                if targets is None:
                    if not show(WINDOW_NAME, drawing, 0):
                        return False
                    continue
                try:
                    if not cv2.imwrite(targets[index][view], drawing):
                        raise OSError("cv2.imwrite returned False")
                except (OSError, cv2.error) as e:
                    fail(path, f"write {targets[index][view]} from", e)
        return True

    batch = []
    for index, path in enumerate(paths):
        try:
            image = read_image_file(path, "BGR", max_size=args.max_draw_size)
            image = fit_within(image, args.max_draw_size)
        except Exception as e:  # any decoding problem: report the file by name, go on
            fail(path, "read", e)
            progress.update(1)
            continue
        batch.append((index, path, image))
        if len(batch) == args.batch_size:
            keep_going, batch = flush(batch), []
            if not keep_going:  # ESC in the window
                break
    if batch:
        flush(batch)
    progress.close()
    if targets is None:
        close_windows()
    return failed


def run_on_stream(predictor, capture, name, args, score_thresh) -> bool:
    """Predict and draw every frame of an opened cv2.VideoCapture; returns True when no frame
    was lost (undecodable, or failing in the model or the drawing: skipped and counted)."""
    if len(args.view) != 1:
        raise UsageError("a video or webcam stream is drawn with a single --view")
    view = args.view[0]
    visualizer = VideoVisualizer(predictor.metadata, ColorMode.IMAGE)
    frames_in = VideoFrames(capture)
    total = frames_in.total  # 0 for a webcam
    writer = None
    if args.output:
        if os.path.isdir(args.output) or not os.path.splitext(args.output)[1]:
            os.makedirs(args.output, exist_ok=True)
            target = os.path.join(args.output, os.path.splitext(os.path.basename(name))[0] + ".mp4")
        else:
            target = args.output
        fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
        height, width = fit_size(
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            args.max_draw_size,
        )
        size = (width, height)
        writer = cv2.VideoWriter(target, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), size, True)
        if not writer.isOpened():
            logger.error(f"cannot open {target} for writing a video")
            return False
    progress = tqdm.tqdm(total=total if total > 0 else None, unit="frame")

    failed = []  # (frame number, error) of decoded frames that failed later

    def flush(frames):
        for (number, frame), prediction in zip(frames, predict_each(predictor, [f for _, f in frames], format="BGR")):
            progress.update(1)
            try:
                if isinstance(prediction, Exception):
                    raise prediction
                drawing = draw_frame(visualizer, frame, prediction, view, score_thresh)
            except Exception as e:  # this frame only: skipped and counted
                logger.error(f"{name}: frame {number} failed: {type(e).__name__}: {e}")
                failed.append(number)
                continue
            if writer is not None:
                writer.write(drawing)
            elif not show(name, drawing, 1):
                return False
        return True

    frames, keep_going = [], True
    for number, frame in frames_in:
        frames.append((number, fit_within(frame, args.max_draw_size)))
        if len(frames) == args.batch_size:
            keep_going, frames = flush(frames), []
            if not keep_going:  # ESC
                break
    if frames and keep_going:
        flush(frames)
    progress.close()
    if writer is not None:
        writer.release()
    lost = frames_in.lost + len(failed)
    if lost:
        announced = f" of {total}" if total else ""
        logger.error(
            f"{name}: {lost}{announced} frames lost: {frames_in.lost} could not be decoded, "
            f"{len(failed)} failed in the model or the drawing; {frames_in.decoded - len(failed)} "
            "frames were written"
        )
    return lost == 0


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="detectron2")
    setup_logger(name="panoptic_segformer")
    logger.info(f"Arguments: {args}")
    try:
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.max_draw_size < 0:
            raise UsageError(f"--max-draw-size must be >= 0, got {args.max_draw_size}")
        if args.input:
            paths, missing = expand_inputs(args.input)
            for pattern in missing:
                logger.error(f"no input file found for {pattern}")
            if not paths:
                raise UsageError("no input image found")
            predictor, score_thresh = make_predictor(args)
            failed = missing + run_on_images(predictor, paths, args, score_thresh)
            if failed:
                logger.error(f"{len(failed)} input(s) failed: {', '.join(failed)}")
            return 1 if failed else 0
        name = args.video_input or "webcam"
        capture = cv2.VideoCapture(args.video_input if args.video_input else 0)
        if not capture.isOpened():
            logger.error(f"cannot open {name}")
            return 1
        try:
            predictor, score_thresh = make_predictor(args)
            return 0 if run_on_stream(predictor, capture, name, args, score_thresh) else 1
        finally:
            capture.release()
            if args.output is None:
                close_windows()
    except UsageError as e:
        logger.error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
