"""``MapToReference``: the batch's labels carried from the prepared grid onto each study's reference series."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ignite.engine import Engine, Events

from custom.atomic_files import atomic_path
from custom.data.errors import OutputError
from custom.preparation.mapping import map_to_reference
from custom.preparation.studies import PreparedStudies

logger = logging.getLogger(__name__)


class MapToReference:
    """Ignite handler: after every iteration, each new ``<prediction_dir>/<study>.nii.gz`` (a label map
    on the prepared 1 mm grid) is resampled label by label (``resample_labels``) onto the study's reference series
    (its shape and affine) and written atomically as ``<output_dir>/<study>.nii.gz``."""

    def __init__(self, studies: PreparedStudies, prediction_dir: str | os.PathLike, output_dir: str | os.PathLike) -> None:
        self.studies = studies
        self.prediction_dir, self.output_dir = Path(prediction_dir), Path(output_dir)
        self.mapped: set[str] = set()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for study, report in self.studies.reports.items():
            src = self.prediction_dir / f"{study}.nii.gz"
            if study in self.mapped or not src.is_file():
                continue
            dst = self.output_dir / f"{study}.nii.gz"
            try:
                with atomic_path(dst) as tmp:
                    map_to_reference(src, report, tmp)
            except OSError as e:
                raise OutputError(f"{dst}: cannot be written ({type(e).__name__}: {e.strerror or e})") from e
            self.mapped.add(study)
            ref = report["reference"]
            logger.info("study %s: label on the %s series' grid %s -> %s", study, ref["sequence"], tuple(ref["shape"]), dst)
