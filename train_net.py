#!/usr/bin/env python
"""Train and evaluate Panoptic SegFormer with Detectron2.

    python train_net.py --config-file configs/quickstart.yaml                  # train + evaluate
    python train_net.py --config-file configs/R50.yaml --num-gpus 8
    python train_net.py --config-file configs/R50.yaml --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file configs/R50.yaml --resume               # continue a run
    python train_net.py --config-file configs/R50.yaml --trust-checkpoint MODEL.WEIGHTS R-50.pkl
    python train_net.py --config-file configs/R50.yaml --dataset mine_train:imgs:pngs:panoptic.json \
        DATASETS.TRAIN "('mine_train',)"                                        # your own data

``--num-gpus N`` starts N processes per machine: NCCL on GPUs, gloo on a machine without CUDA
(where ``MODEL.DEVICE`` is set to "cpu" automatically).
"""
import logging
import os
import weakref

import torch
from detectron2.config import get_cfg
from detectron2.engine import (
    DefaultTrainer,
    default_argument_parser,
    default_setup,
    launch,
)
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import panoptic_segformer.data  # noqa: F401  (registers the toy and sample datasets)
from panoptic_segformer import add_panoptic_segformer_config  # also registers the model
from panoptic_segformer.checkpoint import SafeCheckpointer
from panoptic_segformer.data import register_datasets_from_cfg
from panoptic_segformer.engine import (
    LearningCurveHook,
    build_evaluator,
    build_optimizer,
    build_test_loader,
    build_train_loader,
    build_train_loop,
    wrap_ddp,
)


class Trainer(DefaultTrainer):
    """DefaultTrainer with the project's optimizer, loaders, evaluator and AMP loop.

    ``__init__`` follows ``DefaultTrainer.__init__`` step by step, except that DDP also works on
    CPU (gloo), AMP runs on any device in ``SOLVER.AMP.PRECISION`` and checkpoints go through
    ``SafeCheckpointer`` (safe loading, atomic saving, resume fallback).
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        self._trainer = build_train_loop(cfg, wrap_ddp(model), data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeCheckpointer(
            model, cfg.OUTPUT_DIR, trust_pickle=cfg.MODEL.TRUST_CHECKPOINT, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """DefaultTrainer's hooks, then (main process, ``TEST.LEARNING_CURVE`` set) the learning curve,
        after the EvalHook whose results it plots."""
        hooks = super().build_hooks()
        if self.cfg.TEST.LEARNING_CURVE and comm.is_main_process():
            hooks.append(LearningCurveHook(os.path.join(self.cfg.OUTPUT_DIR, self.cfg.TEST.LEARNING_CURVE)))
        return hooks

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)


def setup(args):
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.DATASETS.COCO_PANOPTIC = list(cfg.DATASETS.COCO_PANOPTIC) + list(getattr(args, "dataset", None) or [])
    if getattr(args, "trust_checkpoint", False):
        cfg.MODEL.TRUST_CHECKPOINT = True
    moved_to_cpu = cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available()
    if moved_to_cpu:
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    register_datasets_from_cfg(cfg)  # in every process: main() runs in each DDP worker
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="panoptic_segformer")
    if moved_to_cpu:
        logging.getLogger("panoptic_segformer").warning("No CUDA device: MODEL.DEVICE set to cpu")
    if cfg.MODEL.DEVICE == "cpu" and comm.get_local_size() > 1:
        # CPU processes on one machine share its cores
        torch.set_num_threads(max(1, torch.get_num_threads() // comm.get_local_size()))
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        SafeCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, trust_pickle=cfg.MODEL.TRUST_CHECKPOINT
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    parser = default_argument_parser()
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="allow MODEL.WEIGHTS files that need full unpickling (.pkl such as the converted "
        "ImageNet ResNets, .pyth, .pth with objects): they can run code, so only for files from "
        "a trusted source (same as MODEL.TRUST_CHECKPOINT True)",
    )
    parser.add_argument(
        "--dataset", action="append", default=[], metavar="NAME:IMAGE_DIR:PANOPTIC_PNG_DIR:PANOPTIC_JSON",
        help="register a COCO-format panoptic dataset under NAME (categories from the JSON; "
        "repeatable; appended to DATASETS.COCO_PANOPTIC); name it in DATASETS.TRAIN / DATASETS.TEST",
    )
    args = parser.parse_args(argv)
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
