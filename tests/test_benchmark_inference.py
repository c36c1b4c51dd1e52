"""Tests of tools/benchmark_inference.py: stage timing from outside, per-image medians, memory."""

import importlib.util
import json
import time

import pytest
import torch
from torch import nn

from conftest import REPO_ROOT

pytest.importorskip(
    "detectron2", reason="detectron2 not installed (install it from its official source)"
)

from test_demo import STUB_CONFIG  # noqa: E402
from test_predictor import StubPanopticModel  # noqa: E402,F401  (registers the stub)

_spec = importlib.util.spec_from_file_location(
    "psf_benchmark", REPO_ROOT / "tools" / "benchmark_inference.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


class Staged(nn.Module):
    """A model with the stage methods of PanopticSegFormer that sleep known times."""

    def __init__(self, sleeps):
        super().__init__()
        self.sleeps = sleeps  # stage method -> seconds
        self.buffer = None

    def _stage(self, name):
        time.sleep(self.sleeps[name])

    def preprocess_image(self, x):
        self._stage("preprocess_image")

    def _backbone_features(self):
        self._stage("_backbone_features")
        self.buffer = torch.ones(64, 2**20 // 4 * 8 // 64)  # 8 MiB kept until the next run

    def _encode(self):
        self._stage("_encode")

    def _locate(self):
        self._stage("_locate")

    def _decode_masks(self):
        self._stage("_decode_masks")

    def _merge(self):
        self._stage("_merge")

    def forward(self, inputs):
        self.buffer = None
        self.preprocess_image(inputs)
        self._backbone_features()
        self._encode()
        self._locate()
        self._decode_masks()
        for _ in inputs:  # once per image, like the per-image merging
            self._merge()
        time.sleep(0.01)  # not in any stage: "other"
        return [{} for _ in inputs]


def test_stage_breakdown_per_image():
    sleeps = {name: 0.005 for _, name in bench.STAGES}
    sleeps["_encode"] = 0.08
    model = Staged(sleeps)
    result = bench.benchmark(model, [{}, {}], warmup=1, iters=3, device=torch.device("cpu"))
    stages = result["stages_ms"]
    assert list(stages) == [label for label, _ in bench.STAGES] + ["other"]
    # per image = per batch of 2 / 2; sleeping takes at least the time asked
    assert 40 <= stages["neck+encoder"] < 240  # upper bound loose: sleep wakes late on a busy machine
    assert 5 <= stages["merging"] < stages["neck+encoder"]  # two merges per batch of two
    assert stages["other"] >= 5
    # medians are not additive, but here the runs are alike
    assert result["total_ms"] == pytest.approx(sum(stages.values()), rel=0.3)
    assert result["cpu_ms"] < result["total_ms"]  # sleeping costs no CPU
    if bench.MemorySampler.available():
        assert result["memory_increase_mib"] >= 7  # the 8 MiB buffer


def test_model_without_stages_gives_the_total_only():
    class Plain(nn.Module):
        def forward(self, inputs):
            time.sleep(0.01)
            return []

    result = bench.benchmark(Plain(), [{}], warmup=0, iters=2, device=torch.device("cpu"))
    assert result["stages_ms"] == {} and result["total_ms"] >= 10


def test_cli_json(tmp_path, capsys):
    config = tmp_path / "stub.yaml"
    config.write_text(STUB_CONFIG)
    code = bench.main(
        [
            "--config-file",
            str(config),
            "--height",
            "48",
            "--width",
            "64",
            "--batch-size",
            "2",
            "--iters",
            "2",
            "--seed",
            "3",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["height"], out["width"], out["batch_size"], out["weights"]) == (48, 64, 2, "random")
    assert out["total_ms"] > 0 and out["peak_memory_mib"] > 0
    # every input of the stub got exactly (3, 48, 64): no resizing by the benchmark
    assert {shape for call in StubPanopticModel.calls[-2:] for _, shape, _, _ in call} == {
        (3, 48, 64)
    }
    assert bench.main(["--config-file", str(config), "--iters", "0"]) == 2


def test_panoptic_segformer_has_every_stage():
    """A renamed stage method would silently vanish from the breakdown."""
    from panoptic_segformer.modeling import PanopticSegFormer

    for _, name in bench.STAGES:
        assert callable(getattr(PanopticSegFormer, name, None)), name
