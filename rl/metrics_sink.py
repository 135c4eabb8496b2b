"""Where the trainer's per-step metrics go besides the store: TensorBoard always, Weights & Biases when a
project is given. Both are imported only when a trainer starts."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainwire.settings import TrainerSettings

__all__ = ["MetricsSink"]


class MetricsSink:
    """TensorBoard (always) and Weights & Biases (when a project is given)."""

    def __init__(self, settings: TrainerSettings) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(settings.tensorboard_dir or settings.checkpoint_dir / "tensorboard"))
        self.wandb = None
        if settings.wandb_project:
            import wandb

            self.wandb = wandb.init(project=settings.wandb_project, config=settings.model_dump(mode="json"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.tb.close()
        if self.wandb:
            self.wandb.finish()
