"""A folder of studies as they come from the scanner -> a BraTS 2021 folder the bundle segments.

::

    <study_dir>/<study>/<series>.nii.gz     any file names: the sequence of each series comes from its
                                            name by the series rules (``custom.data.dicom_series``)
    <study_dir>/<study>/.../<files>         or DICOM files in folders below the study (an archive's download:
                                            a folder per series, any depth), the sequence from each series'
                                            SeriesDescription by the same rules; converted to NIfTI first

:class:`PreparedStudies` prepares every study (:func:`~custom.preparation.study.prepare_study`) into
``<prepared_dir>/<study>/`` and keeps going past a study that cannot be prepared (its error is kept
and reported with the batch's). ``configs/clinical.json`` puts it in front of ``inference.json``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Mapping

from custom.data.batch import CheckedCases, check_cases
from custom.data.dicom_files import dicom_series, dicom_to_nifti
from custom.data.dicom_series import SeriesMatchError, classify, match_series, parse_rules
from custom.data.errors import BraTSDataError
from custom.data.vocabulary import MODALITIES, describe_sequences, strip_nifti_suffix
from custom.preparation.study import N4_SEQUENCES, bias_corrected, prepare_study

logger = logging.getLogger(__name__)


def study_series(study: str | os.PathLike, rules: Mapping[str, re.Pattern] | None = None,
                 nifti_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Sequence -> NIfTI file of the study folder ``study``, one file per sequence, the sequence read
    from the file name by ``rules`` (``custom.data.dicom_series.parse_rules``; None: the defaults); of
    several files of one sequence the one with the most voxels. FLAIR or T2 must be present; raises
    ``SeriesMatchError`` listing every file otherwise, or when two files of one sequence are the same size.

    With ``nifti_dir``, DICOM series in ``study`` and the folders below it count too
    (``custom.data.dicom_files.dicom_series``: the sequence from the SeriesDescription, the size rows x columns x
    instances); those used are written there as ``<sequence>.nii.gz`` (``dicom_to_nifti``). DICOM series of a
    sequence from more than one study (StudyInstanceUID: a patient's folder with two dates) raise ``SeriesMatchError``."""
    folder = Path(study)
    rules = rules or parse_rules(None)
    files = sorted(f for f in folder.iterdir() if f.is_file() and strip_nifti_suffix(f.name))
    described = [{"SeriesDescription": strip_nifti_suffix(f.name), "SeriesNumber": i + 1, "Modality": "NIfTI", "path": f,
                  "voxels": _voxels(f)} for i, f in enumerate(files)]
    if nifti_dir is not None:
        found = dicom_series(folder)
        by_study: dict[str, list[Mapping]] = {}
        for s in found:
            if classify(s["SeriesDescription"], rules):
                by_study.setdefault(s["StudyInstanceUID"], []).append(s)
        if len(by_study) > 1:
            listing = "; ".join(f"{s[0]['StudyDate'] or 'no date'} {s[0]['StudyDescription']!r} ({len(s)} series, {uid})"
                                for uid, s in sorted(by_study.items(), key=lambda kv: kv[1][0]["StudyDate"]))
            raise SeriesMatchError(f"study {folder.name}: its DICOM series come from {len(by_study)} studies ({listing}): "
                                   f"put each study in a folder of its own, so that series of different dates are not mixed")
        described += found
    hits = match_series(described, rules, where=f"study {folder.name}", allow_missing=True)
    return {seq: dicom_to_nifti(s, Path(nifti_dir) / f"{seq}.nii.gz") if "files" in s else s["path"] for seq, s in hits.items()}


def _voxels(path: Path) -> int:
    """Voxels of a NIfTI file from its header (0 when it cannot be read: reading the series says why)."""
    import nibabel as nib

    try:
        return math.prod(nib.load(path).shape)
    except Exception:  # a bad file is reported when it is read for preparation
        return 0


class PreparedStudies:
    """Every study folder of ``study_dir`` prepared into ``prepared_dir/<study>/`` (BraTS 2021 naming) on
    a grid of ``spacing`` mm in the reference series' space (``reference``: T1ce, else FLAIR, else T1, else T2).

    ``dataset_dir``: ``prepared_dir``, for the bundle's data layer; ``reports``: study -> preparation
    report (``<study>_preparation.json``: transforms, mutual information, brain volume in mL, the
    reference series' grid); ``refused``: study -> why it could not be prepared. Raises
    ``BraTSDataError`` when ``study_dir`` holds no study folder or none can be prepared.
    """

    def __init__(self, study_dir: str | os.PathLike, prepared_dir: str | os.PathLike, series_rules=None,
                 bias_correction: bool | list[str] = N4_SEQUENCES, reference: str | None = None, spacing: float = 1.0) -> None:
        self.study_dir, self.prepared_dir = Path(study_dir), Path(prepared_dir)
        if not self.study_dir.is_dir():
            raise BraTSDataError(f"{self.study_dir}: not a folder of studies (expected <study>/<series>.nii.gz, or DICOM files below <study>/)")
        studies = sorted(d for d in self.study_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not studies:
            raise BraTSDataError(f"{self.study_dir}: no study folder (expected <study>/<series>.nii.gz, or DICOM files below <study>/)")
        try:
            rules = parse_rules(series_rules)
            bias_corrected(bias_correction, MODALITIES)
        except ValueError as e:
            raise BraTSDataError(str(e)) from e
        self.reports: dict[str, dict] = {}
        self.refused: dict[str, str] = {}
        for d in studies:
            try:
                series = study_series(d, rules, nifti_dir=self.prepared_dir.with_name(f"{self.prepared_dir.name}_series") / d.name)
                report = prepare_study(series, self.prepared_dir / d.name, reference=reference,
                                       bias_correction=bias_correction, case_id=d.name, spacing=float(spacing))
            except (BraTSDataError, SeriesMatchError) as e:
                self.refused[d.name] = f"study {d.name}: {e}"
                logger.error("%s (the other studies go on)", self.refused[d.name])
                continue
            self.reports[d.name] = report
            regs = ", ".join(f"{describe_sequences([s])} {r['registration']['rotation_total_deg']:.1f} deg, "
                             f"MI {r['registration']['mutual_information']}" for s, r in report["series"].items()
                             if s != report["reference"]["sequence"])
            logger.info("study %s: %s on the %s grid; brain %.0f mL; registered %s; %.1f s", d.name,
                        describe_sequences(report["sequences"]), describe_sequences([report["reference"]["sequence"]]),
                        report["brain"]["volume_ml"], regs or "nothing", report["seconds"])
        if not self.reports:
            raise BraTSDataError(f"{self.study_dir}: no study can be prepared:\n" + "\n".join(self.refused.values()))

    @property
    def dataset_dir(self) -> str:
        return os.fspath(self.prepared_dir)

    def checked_cases(self) -> CheckedCases:
        """``custom.data.batch.check_cases`` of the prepared folder, the studies that could not be
        prepared added to its ``refused`` (so the batch summary names them)."""
        checked = check_cases(self.prepared_dir)
        checked.refused = {**self.refused, **checked.refused}
        return checked
