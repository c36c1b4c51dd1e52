"""torch.compile of the model's stages (issue 11): in-place wrapping, same outputs, and the
eager fallback when compilation fails (forced with a failing backend)."""
import copy
import logging

import pytest
import torch

from conftest import requires_detectron2

pytestmark = requires_detectron2

from panoptic_segformer.compile import ALL_STAGE_MODULES, CompiledForward, compile_stages  # noqa: E402


def _failing_backend(graph_module, example_inputs):
    raise RuntimeError("forced compiler failure")


def _small_model():
    from test_meta_arch import build, permissive, small_cfg

    return permissive(build(small_cfg(), seed=0).eval())


def _run(model, h=96, w=128):
    from test_meta_arch import synthetic_input

    with torch.no_grad():
        return model([synthetic_input(h, w, seed=0, with_targets=False)])[0]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_stages_give_the_eager_outputs():
    """Dynamo traces every stage (backend "eager": the FX graphs run as captured, no codegen, so
    the test takes seconds; inductor is what the benchmark measures)."""
    eager = _small_model()
    model = copy.deepcopy(eager)
    keys = set(model.state_dict())
    assert compile_stages(model, ALL_STAGE_MODULES, backend="eager") == list(ALL_STAGE_MODULES)
    assert set(model.state_dict()) == keys  # parameters untouched, checkpoints still load
    ref, out = _run(eager), _run(model)
    assert torch.equal(ref["panoptic_seg"][0], out["panoptic_seg"][0])
    assert ref["panoptic_seg"][1] == out["panoptic_seg"][1]
    for name in ALL_STAGE_MODULES:
        assert model.get_submodule(name).forward.failed is None, name
    with pytest.raises(RuntimeError, match="already compiled"):
        compile_stages(model, ["neck"], backend="eager")


def test_failed_compilation_falls_back_to_eager_with_one_warning(caplog):
    eager = _small_model()
    model = copy.deepcopy(eager)
    compile_stages(model, ["neck", "head.encoder"], backend=_failing_backend)
    with caplog.at_level(logging.WARNING, logger="panoptic_segformer.compile"):
        out = _run(model)
        again = _run(model)
    warnings = [r.getMessage() for r in caplog.records if "torch.compile of" in r.getMessage()]
    assert len(warnings) == 2 and "neck" in warnings[0] and "head.encoder" in warnings[1]
    assert "forced compiler failure" in warnings[0]
    assert isinstance(model.neck.forward.failed, Exception)
    ref = _run(eager)
    for o in (out, again):
        assert torch.equal(ref["panoptic_seg"][0], o["panoptic_seg"][0])


def test_bad_input_raises_the_eager_error_and_keeps_the_compiled_path():
    calls = []

    def compiled(x):
        calls.append(x)
        raise RuntimeError("compiled path failed on bad input")

    def eager(x):
        raise ValueError(f"bad input {x}")

    forward = CompiledForward("stage", eager, compiled)
    with pytest.raises(ValueError, match="bad input 3"):
        forward(3)
    assert forward.failed is None and calls == [3]
