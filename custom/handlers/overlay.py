"""A validation handler that draws the first case's prediction as a PNG (for the MLflow run and humans)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ignite.engine import Engine, Events

from custom.render import render_case
from custom.transforms.regions import RegionsToLabel

logger = logging.getLogger(__name__)


class ValidationOverlay:
    """Validation handler: after each validation, a PNG of the first case (four modalities and the
    predicted label over FLAIR on the axial slice with most tumour), for the MLflow run and humans.

    Expects the evaluator's output to hold ``image`` ``(B, 4, H, W, D)`` and ``pred`` region masks
    ``(B, 3, H, W, D)``; the label values follow ``convention``.
    """

    def __init__(self, path: str | os.PathLike, convention) -> None:
        self.path = Path(path)
        self.to_label = RegionsToLabel(convention)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration != 1 + (engine.state.epoch - 1) * engine.state.epoch_length:
            return  # only the epoch's first case
        out = engine.state.output[0] if isinstance(engine.state.output, list) else engine.state.output
        batch = engine.state.batch[0] if isinstance(engine.state.batch, list) else engine.state.batch
        image, pred = out["image"], out["pred"]
        affine = image.affine.cpu().numpy() if hasattr(image, "affine") else None
        label = self.to_label(pred.detach().cpu())[0].numpy()
        img = image.detach().cpu().float().numpy()
        brain = (img != 0).any(axis=0)
        # z-scored channels have negative values; shift each to be positive inside the brain for display
        channels = [((c - c[brain].min() + 1e-3) * brain) if brain.any() else c for c in img]
        try:
            render_case(channels, label, self.path, affine=affine, convention=self.to_label.convention,
                        title=f"validation case {batch.get('case_id', '')}: prediction (epoch {engine.state.epoch})")
        except Exception as e:  # a picture must never stop training
            logger.warning(f"could not write {self.path}: {e}")
