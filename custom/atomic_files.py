"""Atomic file writes: write beside the target under a temporary name, flush to disk, rename onto it.

A reader sees the old file or the new one, never a partial one; a failed write leaves no temporary
file behind. The temporary name keeps the target's suffix (``.nii.gz`` writers choose the format by it).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".partial-"
"""Temporary files are ``.partial-<8 hex>-<target name>``: hidden, and recognisable after a crash."""
TEMP_NAME = re.compile(r"^\.partial-[0-9a-f]{8}-")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to: renamed onto ``path`` when the block succeeds,
    removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def atomic_copy(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy ``src`` to ``dest`` atomically (``dest``'s folder is created if needed)."""
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout)
        fout.flush()
        os.fsync(fout.fileno())
