"""panoptic_segformer.checkpoint: the loading policy (no code runs from a weights file unless the
user opts in; clear errors for empty, random and truncated files; NaN / Inf refused), atomic
saving, and the resume fallback of SafeCheckpointer."""
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, requires_detectron2
from torch import nn

pytestmark = requires_detectron2


class _Payload:
    """Unpickling it creates the file ``marker``: stands for arbitrary code in a weights file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious_pickle(path, marker):
    """A Detectron2-style .pkl whose unpickling creates ``marker``."""
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": _Payload(marker)}, "__author__": "attacker"}, f)


def _loading():
    from panoptic_segformer.checkpoint import loading

    return loading


def test_pickles_are_refused_unless_trusted(tmp_path):
    L = _loading()
    marker = tmp_path / "marker"
    pkl = tmp_path / "evil.pkl"
    write_malicious_pickle(pkl, marker)
    with pytest.raises(L.UntrustedCheckpointError, match="MODEL.TRUST_CHECKPOINT"):
        L.load_checkpoint_file(str(pkl))
    assert not marker.exists()
    # the same payload in a .pth: the weights-only reader names the global it refuses
    pth = tmp_path / "evil.pth"
    torch.save({"model": {"w": _Payload(marker)}}, pth)
    with pytest.raises(L.UntrustedCheckpointError, match="Unsupported global"):
        L.load_checkpoint_file(str(pth))
    assert not marker.exists()
    # opting in really unpickles (so the refusal above is what protects)
    L.load_checkpoint_file(str(pkl), trust=True)
    assert marker.exists()


def test_empty_random_and_truncated_files_say_what_they_are(tmp_path):
    L = _loading()
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(L.CorruptCheckpointError, match="empty"):
        L.load_checkpoint_file(str(empty))
    random_bytes = tmp_path / "random.pth"
    random_bytes.write_bytes(bytes(range(1, 256)) * 20)
    # not "pass --trust": trusting a random file would not help
    for trust in (False, True):
        with pytest.raises(L.CorruptCheckpointError, match="not a checkpoint"):
            L.load_checkpoint_file(str(random_bytes), trust=trust)
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(L.CorruptCheckpointError, match="truncated or corrupt"):
        L.load_checkpoint_file(str(truncated))
    legacy = tmp_path / "legacy.pth"  # the pre-zip torch.save format, cut short
    torch.save({"w": torch.zeros(1000)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:40])
    with pytest.raises(L.CorruptCheckpointError):
        L.load_checkpoint_file(str(legacy))


def test_first_non_finite_names_the_tensor():
    L = _loading()
    state = {"a": torch.zeros(3), "steps": torch.tensor(3), "b": torch.tensor([1.0, float("nan"), float("inf")])}
    assert L.first_non_finite(L.iter_tensors(state)) == "b (1 NaN, 1 Inf of 3 values)"
    assert L.first_non_finite(L.iter_tensors({"a": torch.zeros(3)})) is None
    nested = {"trainer": {"optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}}}
    with pytest.raises(L.NonFiniteCheckpointError, match=r"trainer\.optimizer\.state\.0\.exp_avg"):
        L.check_finite(nested, "x")


# --------------------------------------------------------------------------- SafeCheckpointer


class _Counter:
    """A trainer-like checkpointable: its state is the iteration."""

    def __init__(self):
        self.iteration = -1

    def state_dict(self):
        return {"iteration": self.iteration}

    def load_state_dict(self, state):
        self.iteration = state["iteration"]


def _checkpointer(save_dir, model=None, **kwargs):
    from panoptic_segformer.checkpoint import SafeCheckpointer

    model = model if model is not None else nn.Linear(2, 2)
    counter = _Counter()
    return SafeCheckpointer(model, str(save_dir), trainer=counter, **kwargs), model, counter


def test_loading_nan_weights_is_refused_by_name(tmp_path):
    from panoptic_segformer.checkpoint import NonFiniteCheckpointError

    ckpt, model, _ = _checkpointer(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["weight"][1, 0] = float("nan")
    torch.save({"model": state}, tmp_path / "nan.pth")
    before = model.weight.detach().clone()
    with pytest.raises(NonFiniteCheckpointError, match=r"nan\.pth.*weight \(1 NaN"):
        ckpt.load(str(tmp_path / "nan.pth"))
    assert torch.equal(model.weight, before)  # nothing was loaded


def test_save_refuses_non_finite_state_and_keeps_the_tag(tmp_path):
    from panoptic_segformer.checkpoint import NonFiniteCheckpointError

    ckpt, model, counter = _checkpointer(tmp_path)
    counter.iteration = 4
    ckpt.save("model_0000004")
    with torch.no_grad():
        model.bias[0] = float("inf")
    counter.iteration = 5
    with pytest.raises(NonFiniteCheckpointError, match="bias"):
        ckpt.save("model_0000005")
    assert not (tmp_path / "model_0000005.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000004.pth"]  # no temp file


_KILL_DURING_SAVE = """
import os, signal, sys, torch
from torch import nn
from panoptic_segformer.checkpoint import SafeCheckpointer

class Counter:
    def state_dict(self): return {"iteration": 7}
    def load_state_dict(self, s): pass

ckpt = SafeCheckpointer(nn.Linear(64, 64), sys.argv[1], trainer=Counter())
def dying_save(obj, f):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # as a crash or kill -9 during the write
torch.save = dying_save
ckpt.save(sys.argv[2])
"""


@pytest.mark.parametrize("name", ["model_0000007", "model_0000003"])
def test_a_kill_during_save_leaves_no_truncated_checkpoint(tmp_path, name):
    """model_0000003 exists before (an overwrite); model_0000007 is new."""
    ckpt, _, counter = _checkpointer(tmp_path)
    counter.iteration = 3
    ckpt.save("model_0000003")
    intact = (tmp_path / "model_0000003.pth").read_bytes()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    res = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(tmp_path), name], env=env)
    assert res.returncode == -signal.SIGKILL
    assert (tmp_path / "model_0000003.pth").read_bytes() == intact
    assert not (tmp_path / "model_0000007.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    ckpt2, _, counter2 = _checkpointer(tmp_path)
    ckpt2.resume_or_load("", resume=True)
    assert counter2.iteration == 3


def _three_checkpoints(tmp_path):
    ckpt, _, counter = _checkpointer(tmp_path)
    for it in (1, 2, 3):
        counter.iteration = it
        ckpt.save(f"model_{it:07d}")
        os.utime(tmp_path / f"model_{it:07d}.pth", (it, it))  # mtime order = iteration order
    return tmp_path / "model_0000003.pth"


def _resume(tmp_path):
    """(resumed iteration, messages of the checkpointer's logger)."""
    from test_predictor import ListHandler

    ckpt, _, counter = _checkpointer(tmp_path)
    with ListHandler("panoptic_segformer.checkpoint.checkpointer") as log:
        ckpt.resume_or_load("", resume=True)
    assert ckpt.has_checkpoint()  # so that DefaultTrainer starts at iteration + 1
    return counter.iteration, log.messages


def test_resume_falls_back_to_the_newest_loadable_checkpoint(tmp_path):
    newest = _three_checkpoints(tmp_path)
    assert _resume(tmp_path) == (3, [])
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, still named in last_checkpoint
    iteration, log = _resume(tmp_path)
    assert iteration == 2
    assert any("model_0000003.pth" in m and "truncated" in m for m in log)
    assert any("Resumed from" in m and "model_0000002.pth" in m for m in log)
    tag = tmp_path / "last_checkpoint"
    tag.write_text("")
    iteration, log = _resume(tmp_path)
    assert iteration == 2 and any("is empty" in m for m in log)
    tag.write_text("model_0000009.pth")
    iteration, log = _resume(tmp_path)
    assert iteration == 2 and any("does not exist" in m for m in log)
    tag.unlink()
    iteration, log = _resume(tmp_path)
    assert iteration == 2 and any("is missing" in m for m in log)


def test_resume_without_any_loadable_checkpoint_is_an_error(tmp_path):
    from panoptic_segformer.checkpoint import CheckpointError

    (tmp_path / "last_checkpoint").write_text("model_0000005.pth")
    (tmp_path / "model_0000005.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no loadable checkpoint.*model_0000005.pth is empty"):
        _resume(tmp_path)
    # an empty OUTPUT_DIR is a first run: resume starts from MODEL.WEIGHTS, as in Detectron2
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    ckpt, _, counter = _checkpointer(fresh)
    ckpt.resume_or_load("", resume=True)
    assert counter.iteration == -1 and not ckpt.has_checkpoint()
