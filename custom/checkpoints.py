"""Checkpoint files written by the bundle's ``CheckpointSaver`` handlers."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver


def latest(ckpt_dir: str | os.PathLike, prefix: str = "resume") -> str | None:
    """Path of the newest ``<prefix>_*=<N>.pt`` in ``ckpt_dir`` (highest N), or None.

    MONAI's ``CheckpointSaver`` names interval checkpoints ``<prefix>_checkpoint_epoch=<N>.pt`` and
    writes them atomically (temporary file, then rename), so a listed file is always complete.
    """
    pattern = re.compile(re.escape(prefix) + r"_.*=(\d+)\.pt$")
    found = []
    for p in Path(ckpt_dir).glob(f"{prefix}_*.pt") if Path(ckpt_dir).is_dir() else []:
        m = pattern.match(p.name)
        if m:
            found.append((int(m.group(1)), str(p)))
    return max(found)[1] if found else None


class AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` that writes to a temporary file and renames it (never a half-written
    checkpoint), optionally under a fixed file name like MONAI's own saver."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        # A fixed name (e.g. the best model.pt) is replaced atomically by the next save: removing it
        # first would leave a moment without the file (a server reading it would find no weights).
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files are written atomically.

    MONAI writes in place (``atomic=False``, for file permissions that ignite now sets itself), so
    a process killed mid-save leaves a truncated ``.pt``; here every save goes through
    :class:`AtomicDiskSaver`. Interval checkpoints also hold the saver's own list of saved files
    (key ``checkpointer``; load it into :attr:`interval_checkpoint` on resume) so that a resumed
    run keeps pruning to ``n_saved`` files. Same arguments as ``CheckpointSaver``.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        fixed = {"_final_checkpoint": kwargs.get("final_filename"), "_key_metric_checkpoint": kwargs.get("key_metric_filename")}
        for name in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            checkpoint = getattr(self, name)
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, fixed.get(name))
        if self._interval_checkpoint is not None:
            self._interval_checkpoint.include_self = True

    @property
    def interval_checkpoint(self):
        """The ignite ``Checkpoint`` behind interval saves (its ``state_dict`` lists the saved files)."""
        return self._interval_checkpoint
