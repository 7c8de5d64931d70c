"""torchtitan's metrics processor plus the loss terms `loss.Qwen35Loss` records (e.g. the MTP loss), logged as
`loss_metrics/<name>` (console, TensorBoard, W&B) with the global value of one training step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchtitan.components.metrics import MetricsProcessor
from torchtitan.distributed import utils as dist_utils

from .loss import pop_loss_metrics


class Qwen35MetricsProcessor(MetricsProcessor):
    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        pass

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The step last logged, or before this run's first step (a resumed run starts past 0): set by the trainer
        self.last_logged_step: int | None = None

    def log(self, step: int, global_avg_loss: float, global_max_loss: float, grad_norm: float,
            extra_metrics: dict[str, Any] | None = None):
        """Each recorded term is a sum over microbatches of (local sum / global valid tokens): summed over the
        data-parallel ranks (as torchtitan sums the total loss) and averaged over the steps since the last log."""
        extra = dict(extra_metrics or {})
        steps = max(step - (self.last_logged_step or 0), 1)
        self.last_logged_step = step
        for name, value in pop_loss_metrics().items():
            if self.parallel_dims.dp_cp_enabled:
                value = dist_utils.dist_sum(value, self.parallel_dims.get_optional_mesh("loss"))
            extra[f"loss_metrics/{name}"] = float(value) / steps
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)
