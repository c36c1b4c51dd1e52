"""Tests of tools/benchmark_against_commit.py: baseline arguments and the summary of the runs."""
import importlib.util

import pytest
from conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location("psf_against", REPO_ROOT / "tools" / "benchmark_against_commit.py")
against = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(against)


def test_the_baseline_gets_the_arguments_without_variants():
    args = ["--config-file", "c.yaml", "--variants", "fp32", "bf16+cl", "--iters", "3"]
    assert against._without_variants(args) == ["--config-file", "c.yaml", "--iters", "3"]
    assert against._without_variants(["--variants", "bf16"]) == []


def _run(total, backbone):
    return {"total_ms": total, "stages_ms": {"backbone": backbone, "other": total - backbone}}


def test_summary_is_the_median_over_rounds_and_the_ratio_to_the_baseline_median():
    baseline = [_run(100.0, 40.0), _run(120.0, 50.0), _run(110.0, 45.0)]
    current = [{"variants": {"bf16": _run(50.0, 20.0)}}, {"variants": {"bf16": _run(66.0, 30.0)}}]
    table = against.summarise(baseline, current)
    assert table["baseline fp32"]["total_ms"] == 110.0 and table["baseline fp32"]["totals_ms"] == [100.0, 120.0, 110.0]
    assert table["baseline fp32"]["stages_ms"]["backbone"] == 45.0
    assert table["bf16"]["total_ms"] == 58.0 and table["bf16"]["stages_ms"]["backbone"] == 25.0
    assert table["bf16"]["ratio"] == pytest.approx(58.0 / 110.0)
    text = against.format_table(table, "abc123")
    assert "0.53" in text and "abc123" in text


def test_arguments_are_checked(capsys):
    assert against.main(["abc", "--rounds", "0", "--", "--config-file", "c.yaml"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
    assert against.main(["abc", "--", "--iters", "3"]) == 2
    assert "--config-file" in capsys.readouterr().err
