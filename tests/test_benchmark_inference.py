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
        assert result["working_memory_mib"] >= 7  # the 8 MiB buffer


def test_variants_run_round_robin_and_get_their_own_breakdown():
    order = []

    class Named(Staged):
        def __init__(self, name, sleeps):
            super().__init__(sleeps)
            self.name = name

        def forward(self, inputs):
            order.append(self.name)
            return super().forward(inputs)

    fast = {name: 0.002 for _, name in bench.STAGES}
    slow = dict(fast, _decode_masks=0.06)
    results = bench.benchmark_variants(
        {"a": Named("a", fast), "b": Named("b", slow)}, [{}], warmup=1, iters=2, device=torch.device("cpu")
    )
    assert order == ["a", "b", "a", "b", "a", "b"]  # warm-ups, then alternating timed runs
    assert results["b"]["stages_ms"]["mask decoders"] > 40 > results["a"]["stages_ms"]["mask decoders"]
    assert results["a"]["first_call_s"] > 0


def test_variant_names_and_models():
    from test_meta_arch import build, small_cfg

    from panoptic_segformer.compile import CompiledForward

    base = build(small_cfg()).eval()
    names = bench.variant_list(["fp32", "bf16"], "both", "off")
    models = bench.variant_models(base, names)
    assert list(models) == ["fp32", "fp32+cl", "bf16", "bf16+cl"]
    assert [m.precision for m in models.values()] == ["fp32", "fp32", "bf16", "bf16"]
    assert base.backbone.stem.conv1.weight.is_contiguous()  # the base model is untouched
    assert models["bf16+cl"].backbone.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    compiled = bench.variant_models(base, ["bf16+compile"])["bf16+compile"]
    with pytest.raises(ValueError, match="PRECISION"):
        bench.parse_variant("bf16+compile+fast")
    assert isinstance(compiled.neck.forward, CompiledForward) and bench.fallbacks(compiled) == []


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
            "--precision",
            "fp32",
            "--compile",
            "off",
            "--gflops",
            "0.5",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["height"], out["width"], out["batch_size"], out["weights"]) == (48, 64, 2, "random")
    assert list(out["variants"]) == ["fp32"]
    variant = out["variants"]["fp32"]
    assert variant["total_ms"] > 0 and variant["working_memory_mib"] >= 0
    assert variant["gflop_per_s"] == pytest.approx(0.5 / (variant["total_ms"] / 1000))
    assert out["matmul_gflop_per_s"]["float32"] > 0
    # every input of the stub got exactly (3, 48, 64): no resizing by the benchmark
    assert {shape for call in StubPanopticModel.calls[-2:] for _, shape, _, _ in call} == {
        (3, 48, 64)
    }
    assert bench.main(["--config-file", str(config), "--iters", "0"]) == 2
    # the stub has no precision setting: only fp32 can be benchmarked
    assert bench.main(["--config-file", str(config), "--precision", "bf16", "--compile", "off"]) == 2


def test_panoptic_segformer_has_every_stage():
    """A renamed stage method would silently vanish from the breakdown."""
    from panoptic_segformer.modeling import PanopticSegFormer

    for _, name in bench.STAGES:
        assert callable(getattr(PanopticSegFormer, name, None)), name
