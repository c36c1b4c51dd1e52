"""LearningCurveHook: records the PQ results of each evaluation and draws them as a PNG."""
from types import SimpleNamespace

import pytest
from conftest import requires_detectron2

pytestmark = requires_detectron2


def test_hand_built_results_are_recorded_and_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    from panoptic_segformer.engine import LearningCurveHook

    out = tmp_path / "vis" / "curve.png"
    hook = LearningCurveHook(str(out))
    hook.record(100, {"panoptic_seg/PQ": 20.0, "panoptic_seg/PQ_th": 5.0, "panoptic_seg/PQ_st": 40.0,
                      "panoptic_seg/SQ": 70.0})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = out.stat().st_size
    hook.record(200, {"panoptic_seg/PQ": 30.5, "panoptic_seg/PQ_th": 10.0, "panoptic_seg/PQ_st": 51.0})
    assert hook.points == {"PQ": [(100, 20.0), (200, 30.5)], "PQ_th": [(100, 5.0), (200, 10.0)],
                           "PQ_st": [(100, 40.0), (200, 51.0)]}
    assert out.stat().st_size != first  # redrawn with the second point
    assert not list(out.parent.glob("*.tmp.png"))


def test_reads_the_eval_hook_results_from_the_storage_once(tmp_path):
    from detectron2.utils.events import EventStorage

    from panoptic_segformer.engine import LearningCurveHook

    hook = LearningCurveHook(str(tmp_path / "curve.png"))
    with EventStorage(start_iter=0) as storage:
        # as TrainerBase: storage.iter == trainer.iter in a step; both max_iter in after_train
        trainer = hook.trainer = SimpleNamespace(storage=storage, iter=0)
        storage.put_scalars(total_loss=1.0)
        hook.after_step()  # no evaluation yet
        assert hook.points == {}
        trainer.iter = storage.iter = 49  # EvalHook of period 50 evaluates after iteration 49
        storage.put_scalars(**{"val_a/panoptic_seg/PQ": 12.0, "val_b/panoptic_seg/PQ": 34.0},
                            smoothing_hint=False)
        hook.after_step()
        trainer.iter = storage.iter = 50
        storage.put_scalars(total_loss=0.5)
        hook.after_step()  # the same results again: not a new point
        trainer.iter = storage.iter = 60  # max_iter 60: the final evaluation in after_train
        storage.put_scalars(**{"val_a/panoptic_seg/PQ": 15.0, "val_b/panoptic_seg/PQ": 36.0},
                            smoothing_hint=False)
        hook.after_train()
    assert hook.points == {"val_a/PQ": [(50, 12.0), (60, 15.0)], "val_b/PQ": [(50, 34.0), (60, 36.0)]}


def test_without_matplotlib_it_warns_once_and_keeps_the_points(tmp_path, monkeypatch, caplog):
    import builtins

    from panoptic_segformer.engine import LearningCurveHook

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "curve.png"
    hook = LearningCurveHook(str(out))
    with caplog.at_level("WARNING", logger="panoptic_segformer.engine.learning_curve"):
        hook.record(10, {"panoptic_seg/PQ": 1.0})
        hook.record(20, {"panoptic_seg/PQ": 2.0})
    assert [r.getMessage() for r in caplog.records] == [f"matplotlib is not installed: no learning curve at {out}"]
    assert hook.points == {"PQ": [(10, 1.0), (20, 2.0)]} and not out.exists()
