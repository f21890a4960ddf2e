"""Batch inference over a folder: one bad case does not stop the others.

``inference.json`` segments the cases of ``check_cases(dataset_dir)`` (every file of every case read
and checked first; a case that fails is set aside with its error), writes into an output folder
checked by ``prepare_output_dir`` before the first case, and ends with :class:`BatchSummary`: a log
line with what was written and refused, then a ``BraTSDataError`` listing the refused cases (the
command exits non-zero, its last line of stderr naming them) when there are any.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

from ignite.engine import Engine, Events

from custom.data.cases import list_cases, validate_case
from custom.data.errors import BraTSDataError, OutputError

logger = logging.getLogger(__name__)


@dataclass
class CheckedCases:
    """``datalist``: entries (``BraTSCase.to_dict`` without the label) of the cases that passed;
    ``refused``: case id -> the error that set it aside."""

    datalist: list[dict] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def check_cases(dataset_dir: str | os.PathLike) -> CheckedCases:
    """Every case of ``dataset_dir`` checked in full (``custom.data.validate_case`` with voxels).

    A folder that cannot be listed at all, or in which no case passes, raises ``BraTSDataError``.
    """
    checked = CheckedCases()
    for case in list_cases(dataset_dir, check="none"):
        try:
            validate_case(case, read_voxels=True)
        except BraTSDataError as e:
            checked.refused[case.case_id] = str(e)
            logger.error("%s (the other cases go on)", e)
            continue
        checked.datalist.append({k: v for k, v in case.to_dict().items() if k != "label"})
    if not checked.datalist:
        raise BraTSDataError(f"{dataset_dir}: no case can be segmented:\n" + "\n".join(checked.refused.values()))
    return checked


def prepare_output_dir(path: str | os.PathLike) -> str:
    """Create ``path`` and prove it writable (a probe file, removed); ``OutputError`` naming it otherwise."""
    p = os.fspath(path)
    try:
        os.makedirs(p, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"output folder {p}: not writable ({type(e).__name__}: {e.strerror or e})") from e
    return p


class BatchSummary:
    """Ignite handler: when the run completes (every case of the engine's data written), log how many
    cases went to ``output_dir`` and raise ``BraTSDataError`` naming each of ``cases.refused``."""

    def __init__(self, cases: CheckedCases, output_dir: str) -> None:
        self.cases = cases
        self.output_dir = output_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        dataset = getattr(engine.state.dataloader, "dataset", None)
        written = len(dataset) if dataset is not None else len(self.cases.datalist)
        refused = self.cases.refused
        total = written + len(refused)
        logger.info("segmented %d of %d cases into %s", written, total, self.output_dir)
        if refused:
            raise BraTSDataError(
                f"{len(refused)} of {total} cases not segmented ({written} written to {self.output_dir}): " + "; ".join(refused.values())
            )
