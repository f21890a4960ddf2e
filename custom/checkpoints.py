"""Checkpoint files written by the bundle's ``CheckpointSaver`` handlers."""

from __future__ import annotations

import os
import re
from pathlib import Path


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
