"""Training pipeline: optimizer parameter groups, full-model gradient clipping (also under AMP),
and train_net.py end to end on CPU: resume after a kill, two gloo processes; reliability: no code
from .pkl weights, no step or checkpoint with NaN, resume past a truncated checkpoint."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, requires_detectron2
from torch import nn

pytestmark = requires_detectron2


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.encoder = nn.Module()
        self.encoder.sampling_offsets = nn.Linear(2, 2)
        self.reference_points = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_follow_the_name_substrings():
    from panoptic_segformer.engine import get_param_groups

    net = _Net()
    groups = get_param_groups(net, 1e-3, 1e-4, ["backbone", "sampling_offsets", "reference_points"], 0.1)
    by_name = {g["name"]: g for g in groups}
    ids = lambda mods: {id(p) for m in mods for p in m.parameters()}  # noqa: E731
    assert {id(p) for p in by_name["lr_mult"]["params"]} == ids([net.backbone, net.encoder, net.reference_points])
    assert {id(p) for p in by_name["base"]["params"]} == ids([net.head])  # frozen skipped
    assert by_name["lr_mult"]["lr"] == pytest.approx(1e-4) and by_name["base"]["lr"] == 1e-3
    assert by_name["lr_mult"]["weight_decay"] == by_name["base"]["weight_decay"] == 1e-4


def _grads_with_global_norm_5(params):
    params[0].grad = torch.tensor([3.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0])


def test_full_model_clipping_clips_the_global_norm():
    from panoptic_segformer.engine import add_full_model_gradient_clipping

    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    cls = add_full_model_gradient_clipping(torch.optim.SGD, 0.1)
    # two groups: the clip must span both
    opt = cls([{"params": [params[0]]}, {"params": [params[1]]}], lr=1.0)
    _grads_with_global_norm_5(params)
    opt.step()
    # global norm 5 -> 0.1: every gradient scaled by 0.02 (per-parameter clipping would give 0.1 each)
    assert torch.allclose(params[0].data, torch.tensor([-0.06, 0.0]))
    assert torch.allclose(params[1].data, torch.tensor([0.0, -0.08]))
    with pytest.raises(ValueError, match="clip"):
        add_full_model_gradient_clipping(torch.optim.SGD, 0.0)


def _cfg():
    from detectron2.config import get_cfg

    from panoptic_segformer import add_panoptic_segformer_config

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.SOLVER.BASE_LR = 2e-4
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1
    return cfg


def test_build_optimizer_from_config():
    from panoptic_segformer.engine import build_optimizer

    cfg = _cfg()
    opt = build_optimizer(cfg, _Net())
    assert isinstance(opt, torch.optim.AdamW) and type(opt).__name__ == "AdamWWithFullModelClip"
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([2e-5, 2e-4])
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"  # detectron2's per-parameter clipping
    assert "FullModel" not in type(build_optimizer(cfg, _Net())).__name__
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(cfg, _Net())


class _ListLoader:
    def __iter__(self):
        while True:
            yield [torch.tensor([1.0, 1.0])]


class _LossModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1, bias=False)
        nn.init.zeros_(self.lin.weight)
        self.seen_dtype = None

    def forward(self, batch):
        out = self.lin(torch.stack(batch))
        self.seen_dtype = out.dtype
        return {"loss": 1000.0 * out.float().sum() + 1000.0}


@pytest.mark.parametrize("precision", [torch.float16, torch.bfloat16])
def test_amp_trainer_clips_unscaled_gradients_on_cpu(precision):
    """The gradient is 1000*(1, 1); clipped to norm 0.1 the SGD step is 0.1/sqrt(2) per weight.
    Clipping the *scaled* gradient instead would give a step ~65536x smaller."""
    from detectron2.utils.events import EventStorage

    from panoptic_segformer.engine import AutocastTrainer, add_full_model_gradient_clipping

    model = _LossModel()
    opt = add_full_model_gradient_clipping(torch.optim.SGD, 0.1)(model.parameters(), lr=1.0)
    trainer = AutocastTrainer(model, _ListLoader(), opt, device_type="cpu", precision=precision)
    assert trainer.grad_scaler.is_enabled() == (precision == torch.float16)
    if precision == torch.float16:  # a scale at which the fp16 gradient (1000 * scale) is finite
        trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    with EventStorage(0):
        trainer.run_step()
    assert model.seen_dtype == precision
    expected = torch.full((1, 2), -0.1 / 2**0.5)
    assert torch.allclose(model.lin.weight.data.float(), expected, rtol=1e-3)


def test_amp_dtype():
    from panoptic_segformer.engine import amp_dtype

    assert amp_dtype("bfloat16") is torch.bfloat16 and amp_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="PRECISION"):
        amp_dtype("float8")


# ----------------------------------------------------------------------------- end to end
TINY = [
    "MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "32", "MODEL.PANOPTIC_SEGFORMER.NHEADS", "2",
    "MODEL.PANOPTIC_SEGFORMER.ENC_LAYERS", "1", "MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS", "1",
    "MODEL.PANOPTIC_SEGFORMER.THING_MASK_DECODER_LAYERS", "1",
    "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_DECODER_LAYERS", "1",
    "MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES", "10", "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", "64",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160",
    "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    """A toy dataset root with a small val split (train keeps its default size)."""
    from panoptic_segformer.data.toy_dataset import ensure_toy_split

    root = str(tmp_path_factory.mktemp("toy"))
    ensure_toy_split(root, "train")
    ensure_toy_split(root, "val", num_images=4)
    return root


def _train_cmd(out_dir, *extra, num_gpus=1, opts=()):
    return [sys.executable, str(REPO_ROOT / "train_net.py"), "--config-file",
            str(REPO_ROOT / "configs" / "quickstart.yaml"), "--num-gpus", str(num_gpus),
            "--dist-url", "auto", *extra,
            *TINY, "OUTPUT_DIR", str(out_dir), *opts]


def _env(toy_root):
    env = dict(os.environ, PSF_TOY_ROOT=toy_root, OMP_NUM_THREADS="1")
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also on a machine with GPUs
    return env


def _last_iteration(out_dir):
    tag = out_dir / "last_checkpoint"
    if not tag.is_file():
        return -1
    name = tag.read_text().strip()
    m = re.match(r"model_(\d+)\.pth", name)
    return int(m.group(1)) if m else -1


def test_resume_after_kill_continues_iteration_and_optimizer_state(tmp_path, toy_root):
    out = tmp_path / "run"
    env = _env(toy_root)
    proc = subprocess.Popen(
        _train_cmd(out, opts=["SOLVER.MAX_ITER", "1000", "SOLVER.CHECKPOINT_PERIOD", "2",
                              "DATASETS.TEST", "()"]),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while _last_iteration(out) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # killed mid-way, as a crash would
        proc.wait()
    killed_at = _last_iteration(out)
    assert killed_at >= 3, "no checkpoint was written before the kill"
    ckpt = torch.load(out / f"model_{killed_at:07d}.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == killed_at

    max_iter = killed_at + 4
    res = subprocess.run(
        _train_cmd(out, "--resume", opts=["SOLVER.MAX_ITER", str(max_iter),
                                          "SOLVER.CHECKPOINT_PERIOD", "1000", "DATASETS.TEST", "()"]),
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Starting training from iteration {killed_at + 1}" in res.stdout + res.stderr
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == max_iter - 1
    # AdamW counts its own steps: max_iter in total only if its state survived the restart
    state = final["trainer"]
    steps = {int(s["step"]) for s in state["_trainer"]["optimizer"]["state"].values()}
    assert steps == {max_iter}
    assert state["hooks"]["LRScheduler"]["last_epoch"] == max_iter


def test_two_gloo_processes_train_and_evaluate(tmp_path, toy_root):
    out = tmp_path / "ddp"
    res = subprocess.run(
        _train_cmd(out, num_gpus=2, opts=["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1000",
                                          "MODEL.DEVICE", "cuda"]),
        env=_env(toy_root), capture_output=True, text=True, timeout=600,
    )
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert "World size: 2" in log and "MODEL.DEVICE set to cpu" in log
    assert (out / "log.txt").is_file() and (out / "log.txt.rank1").is_file()
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
    assert (out / "model_final.pth").is_file()
    assert re.search(r"copypaste: PQ,SQ,RQ", log), "evaluation did not run"


def _tiny_model(toy_root, prefix):
    """The TINY quickstart config (on the toy data of ``toy_root``, registered as ``prefix``_*) and
    its model with seeded random weights, on the CPU."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from panoptic_segformer import add_panoptic_segformer_config
    from panoptic_segformer.data import register_toy_panoptic

    register_toy_panoptic(toy_root, prefix=prefix)
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "quickstart.yaml"))
    cfg.merge_from_list(TINY + ["MODEL.DEVICE", "cpu", "DATASETS.TRAIN", f"('{prefix}_train',)"])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_model_trains_on_a_batch_with_an_image_without_segments(tmp_path, toy_root):
    """The mapper's empty Instances go through the model's training step (finite losses)."""
    from detectron2.data import DatasetCatalog

    from panoptic_segformer.data import PanopticDatasetMapper

    cfg, model = _tiny_model(toy_root, "toyempty")
    mapper = PanopticDatasetMapper(cfg, True)
    dicts = DatasetCatalog.get("toyempty_val")[:2]
    empty = dict(dicts[1], segments_info=[])
    batch = [mapper(dicts[0]), mapper(empty)]
    assert len(batch[1]["instances"]) == 0
    losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    losses = model([mapper(empty)])  # no thing and no stuff target in the whole batch
    assert all(torch.isfinite(v) for v in losses.values())


# ----------------------------------------------------------------------------- reliability
def _run(cmd, toy_root):
    res = subprocess.run(cmd, env=_env(toy_root), capture_output=True, text=True, timeout=600)
    return res.returncode, res.stdout + res.stderr


@pytest.mark.parametrize("mode", ["--eval-only", "train"])
def test_a_malicious_pkl_as_model_weights_runs_no_code(tmp_path, toy_root, mode):
    from test_checkpoint import write_malicious_pickle

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pkl"
    write_malicious_pickle(evil, marker)
    extra = [mode] if mode.startswith("--") else []
    code, log = _run(_train_cmd(tmp_path / "out", *extra, opts=[
        "MODEL.WEIGHTS", str(evil), "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()"]), toy_root)
    assert code != 0
    assert not marker.exists(), "unpickling MODEL.WEIGHTS ran code"
    assert "refusing to unpickle" in log and "--trust-checkpoint" in log
    assert not list((tmp_path / "out").glob("model_*.pth"))


def _tiny_state_with_nan(toy_root):
    """The TINY quickstart config and model with one NaN in an encoder sampling_offsets weight."""
    cfg, model = _tiny_model(toy_root, "toynan")
    name = next(n for n, _ in model.named_parameters() if "encoder" in n and n.endswith("sampling_offsets.weight"))
    with torch.no_grad():
        dict(model.named_parameters())[name][3, 5] = float("nan")
    return cfg, model, name


def test_training_from_nan_weights_stops_before_writing_anything(tmp_path, toy_root):
    _, model, name = _tiny_state_with_nan(toy_root)
    weights = tmp_path / "nan.pth"
    torch.save({"model": model.state_dict()}, weights)
    out = tmp_path / "out"
    code, log = _run(_train_cmd(out, opts=["MODEL.WEIGHTS", str(weights), "SOLVER.MAX_ITER", "2",
                                           "SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "()"]), toy_root)
    assert code != 0
    assert f"{name} (1 NaN" in log
    assert not list(out.glob("model_*.pth")) and not (out / "last_checkpoint").exists()


def _one_step(cfg, model):
    """One Detectron2 ``SimpleTrainer`` step on the toy loader: the NonFiniteTrainingError it
    raises and the parameters from before the step."""
    from detectron2.engine import SimpleTrainer
    from detectron2.utils.events import EventStorage

    from panoptic_segformer.engine import NonFiniteTrainingError, build_optimizer, build_train_loader

    model.train()
    trainer = SimpleTrainer(model, build_train_loader(cfg), build_optimizer(cfg, model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with EventStorage(0), pytest.raises(NonFiniteTrainingError) as info:
        trainer.run_step()
    return str(info.value), before


def test_a_nan_weight_stops_training_in_the_forward_pass(toy_root):
    """The failure of the issue: one NaN weight in the encoder. The op propagates it like
    grid_sample, so the step must stop before the matching, naming the NaN parameter, and leave
    every parameter as it was."""
    cfg, model, name = _tiny_state_with_nan(toy_root)
    message, before = _one_step(cfg, model)
    assert f"First non-finite parameter: {name} (1 NaN" in message and "iteration 0" in message
    assert "before the loss" in message
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n], rtol=0, atol=0, equal_nan=True), n


def test_a_nan_gradient_stops_the_step_before_it_writes(toy_root):
    """Finite forward pass, one NaN gradient: full-model clipping would spread the NaN gradient
    norm to every parameter in one step. The step must raise, naming the gradient, and leave
    every parameter as it was."""
    cfg, model = _tiny_model(toy_root, "toynangrad")
    name, param = next((n, p) for n, p in model.named_parameters() if n.endswith("sampling_offsets.weight"))
    param.register_hook(lambda grad: grad * float("nan"))
    message, before = _one_step(cfg, model)
    assert "before the optimizer step" in message and "iteration 0" in message
    assert "First non-finite parameter: none" in message
    assert f"first non-finite gradient: {name} (" in message
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_non_finite_check_without_full_model_clipping():
    from panoptic_segformer.engine import NonFiniteTrainingError, build_optimizer

    cfg = _cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    net = _Net()
    opt = build_optimizer(cfg, net)
    assert type(opt).__name__ == "AdamWWithNonFiniteCheck"
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    net.head.bias.grad[1] = float("-inf")
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(NonFiniteTrainingError, match=r"gradient: head\.bias \(0 NaN, 1 Inf"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    net.head.bias.grad[1] = 1.0
    opt.step()  # finite gradients: a normal step
    assert not torch.equal(before[0], next(net.parameters()))


def test_resume_falls_back_when_the_last_checkpoint_is_truncated(tmp_path, toy_root):
    out = tmp_path / "run"
    code, log = _run(_train_cmd(out, opts=["SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1",
                                           "DATASETS.TEST", "()"]), toy_root)
    assert code == 0, log[-3000:]
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    final = out / "model_final.pth"
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 3])  # as a kill mid-write
    code, log = _run(_train_cmd(out, "--resume", opts=["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD",
                                                       "1000", "DATASETS.TEST", "()"]), toy_root)
    assert code == 0, log[-3000:]
    assert "Resumed from" in log and "model_0000001.pth" in log and "truncated" in log
    assert "Starting training from iteration 2" in log
    assert torch.load(final, map_location="cpu", weights_only=True)["iteration"] == 2


# ----------------------------------------------------------------------------- datasets from paths
def test_trains_and_evaluates_a_dataset_given_only_by_paths(tmp_path, toy_root):
    """``--dataset NAME:IMAGES:PNGS:JSON`` registers a COCO-format folder (no Python code): the
    run trains on it, evaluates PQ on it and plots the two evaluations (TEST.LEARNING_CURVE); the
    saved config alone then evaluates it again with ``--eval-only``."""
    from panoptic_segformer.data.toy_dataset import generate_toy_split

    data = tmp_path / "mine"
    generate_toy_split(str(data), num_images=3, seed=5)
    spec = f"mine:{data / 'images'}:{data / 'panoptic'}:{data / 'panoptic.json'}"
    out = tmp_path / "out"
    code, log = _run(_train_cmd(out, "--dataset", spec, opts=[
        "DATASETS.TRAIN", "('mine',)", "DATASETS.TEST", "('mine',)",
        "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1000",
        "TEST.EVAL_PERIOD", "1", "TEST.LEARNING_CURVE", "vis/curve.png"]), toy_root)
    assert code == 0, log[-3000:]
    assert (out / "model_final.pth").is_file()
    assert "Evaluation results for mine in csv format" in log
    assert len(re.findall(r"copypaste: PQ,SQ,RQ", log)) == 2, "expected evaluations after iterations 1 and 2"
    assert (out / "vis" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    # the spec is part of the run's saved config: --eval-only with that config needs no --dataset
    assert spec in (out / "config.yaml").read_text()
    eval_cmd = [sys.executable, str(REPO_ROOT / "train_net.py"), "--config-file", str(out / "config.yaml"),
                "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth"),
                "OUTPUT_DIR", str(tmp_path / "eval")]
    code, log = _run(eval_cmd, toy_root)
    assert code == 0, log[-3000:]
    assert "Evaluation results for mine in csv format" in log
    assert re.search(r"copypaste: PQ,SQ,RQ", log), "evaluation did not run"


def test_malformed_dataset_flag_is_an_error(tmp_path, toy_root):
    code, log = _run(_train_cmd(tmp_path / "out", "--dataset", "mine:images", opts=[
        "DATASETS.TRAIN", "('mine',)", "SOLVER.MAX_ITER", "1"]), toy_root)
    assert code != 0
    assert "NAME:IMAGE_DIR:PANOPTIC_PNG_DIR:PANOPTIC_JSON" in log
