"""A training progress bar usable as a MONAI bundle handler (``train#handlers``)."""

from __future__ import annotations

from ignite.engine import Engine
from ignite.handlers import ProgressBar


class TrainingProgressBar(ProgressBar):
    """ignite ``ProgressBar`` showing the loss; MONAI calls ``attach(engine)`` with no arguments,
    so the output transform is given here. Shown on a terminal only (``disable=None``)."""

    def __init__(self, output_transform=lambda output: {"loss": output[0]["loss"] if isinstance(output, list) else output["loss"]},
                 **kwargs) -> None:
        kwargs.setdefault("disable", None)
        kwargs.setdefault("persist", True)
        super().__init__(**kwargs)
        self.output_transform = output_transform

    def attach(self, engine: Engine, metric_names=None, output_transform=None, **kwargs) -> None:  # type: ignore[override]
        super().attach(engine, metric_names=metric_names, output_transform=output_transform or self.output_transform, **kwargs)
