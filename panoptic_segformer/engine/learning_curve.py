"""A hook that plots PQ / PQ_th / PQ_st against the iteration after each evaluation."""
import logging
import os
import re
from typing import Dict, List, Tuple

from detectron2.engine import HookBase

__all__ = ["LearningCurveHook"]

logger = logging.getLogger(__name__)

# flattened evaluation results: "panoptic_seg/PQ" (one test set) or "<dataset>/panoptic_seg/PQ"
_PQ_KEY = re.compile(r"^(?:(?P<dataset>.+)/)?panoptic_seg/(?P<metric>PQ|PQ_th|PQ_st)$")


class LearningCurveHook(HookBase):
    """After each evaluation of the trainer, record (iteration, PQ, PQ_th, PQ_st) and redraw a PNG.

    Place it after Detectron2's ``EvalHook``, in the main process only (it writes the file): it
    reads the results that ``EvalHook`` puts into the trainer's ``EventStorage``. The iteration of a point is the number of iterations trained. When
    matplotlib is missing it warns once and draws nothing (the points are still recorded).

    Attributes:
        points: {series: [(iteration, value), ...]}; a series is ``PQ``, ``PQ_th``, ``PQ_st``, or
            ``<dataset>/PQ`` ... with several test sets.
    """

    def __init__(self, output_file: str):
        self._output_file = output_file
        self.points: Dict[str, List[Tuple[int, float]]] = {}
        self._last_recorded_iter = -1
        self._warned_no_matplotlib = False

    def after_step(self):
        self._record_latest(self.trainer.iter + 1)

    def after_train(self):
        self._record_latest(self.trainer.iter)  # == max_iter after a finished training

    def _record_latest(self, iterations_done: int):
        """Record the PQ results that EvalHook stored since the last call, if any."""
        latest = self.trainer.storage.latest()
        results = {k: v for k, (v, it) in latest.items() if _PQ_KEY.match(k) and it > self._last_recorded_iter}
        if results:
            self._last_recorded_iter = max(latest[k][1] for k in results)
            self.record(iterations_done, results)

    def record(self, iteration: int, results: Dict[str, float]) -> None:
        """Append the PQ values of flattened ``results`` at ``iteration`` and redraw the plot."""
        for key, value in results.items():
            m = _PQ_KEY.match(key)
            if m is None:
                continue
            series = m["metric"] if m["dataset"] is None else f"{m['dataset']}/{m['metric']}"
            self.points.setdefault(series, []).append((iteration, float(value)))
        self._draw()

    def _draw(self):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if not self._warned_no_matplotlib:
                logger.warning("matplotlib is not installed: no learning curve at %s", self._output_file)
                self._warned_no_matplotlib = True
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for series, pts in sorted(self.points.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=series)
        ax.set_xlabel("iteration")
        ax.set_ylabel("panoptic quality")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(self._output_file) or ".", exist_ok=True)
        tmp = self._output_file + ".tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self._output_file)
