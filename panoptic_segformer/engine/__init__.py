"""Training and evaluation pieces used by ``train_net.py``."""
from .amp import AutocastTrainer, amp_dtype
from .evaluation import (
    PanopticCOCOEvaluator,
    PanopticQualityEvaluator,
    PanopticSemSegEvaluator,
    build_evaluator,
)
from .learning_curve import LearningCurveHook
from .non_finite import NonFiniteTrainingError
from .optimizer import (
    add_full_model_gradient_clipping,
    add_non_finite_gradient_check,
    build_optimizer,
    get_param_groups,
)
from .train_loop import build_test_loader, build_train_loader, build_train_loop, wrap_ddp

__all__ = [
    "AutocastTrainer",
    "LearningCurveHook",
    "NonFiniteTrainingError",
    "PanopticCOCOEvaluator",
    "PanopticQualityEvaluator",
    "PanopticSemSegEvaluator",
    "add_full_model_gradient_clipping",
    "add_non_finite_gradient_check",
    "amp_dtype",
    "build_evaluator",
    "build_optimizer",
    "build_test_loader",
    "build_train_loader",
    "build_train_loop",
    "get_param_groups",
    "wrap_ddp",
]
