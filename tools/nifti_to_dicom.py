"""BraTS cases as DICOM MR studies, and back: the bridge to a PACS (DICOMweb, e.g. Orthanc).

``write_study`` writes one case (any layout ``custom.data`` reads: a BraTS 2021 / 2023 case folder,
or a 4D MSD Task01 image) as one DICOM MR study with four series, one per modality, in the
project's canonical order T1, T1ce, T2, FLAIR (series numbers 1..4, series descriptions ``T1``,
``T1ce``, ``T2``, ``FLAIR``), sharing one StudyInstanceUID and one FrameOfReferenceUID (the four
modalities of a BraTS case are co-registered on one grid). ``stow`` uploads it with STOW-RS::

    python -m tools.nifti_to_dicom data/synth/BraTS2021_00000 --out /tmp/dicom [--stow http://127.0.0.1:8042/dicom-web]
    python -m tools.nifti_to_dicom data/synth --case BraTS2021_00000 --case BraTS2021_00001 --out /tmp/dicom
    python -m tools.nifti_to_dicom data/msd/imagesTr/BRATS_001.nii.gz --out /tmp/dicom
    python -m tools.nifti_to_dicom studies/P001 --study --out /tmp/dicom   # series on their own grids

A study as it comes from the scanner (``--study``, ``convert_study_folder``: one NIfTI file per series,
named as ``configs/clinical.json`` reads them) keeps each series' own grid and its file name as the
SeriesDescription; its series share the StudyInstanceUID and FrameOfReferenceUID (one session).

Geometry. NIfTI affines map voxel indices (i, j, k) to RAS+ millimetres, DICOM uses LPS+:
``A_lps = diag(-1, -1, 1, 1) @ A_ras``. Slice ``k`` of the NIfTI volume becomes one instance whose
pixel ``(row r, column c)`` is voxel ``(i=c, j=r, k)``: ImageOrientationPatient = the unit LPS
directions of the i and j axes, PixelSpacing = ``[|j step|, |i step|]`` (row spacing first),
ImagePositionPatient = ``A_lps @ (0, 0, k, 1)``, SliceThickness = SpacingBetweenSlices = ``|k step|``.
Affines with shear (non-orthogonal axes) have no DICOM image-plane equivalent and are refused.
Reading the series back (SimpleITK / ITK / MONAI ``LoadImage`` on the folder, GDCM) gives the same
voxels at the same world positions (tests/test_dicomweb.py).

Voxel values. Integer volumes that fit 16 bits are stored as they are (unsigned when
non-negative, else signed), exactly. Anything else (float MRI) is mapped linearly onto uint16 with
RescaleSlope / RescaleIntercept (error at most half a step, ``(max - min) / 65535 / 2``).

UIDs are derived (``pydicom.uid.generate_uid`` entropy) from the case id and a hash of the case's
voxels and affines, so converting the same case twice gives the same UIDs (re-uploading it does not
duplicate it in the PACS) while different data never collide.

Series descriptions are ``custom.data.SEQUENCE_NAMES``; ``custom.data.dicom_series`` matches them
back (the MONAI Label DICOMweb datastore).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from custom.data import LAYOUTS, MODALITIES, REQUIRED_ANY, SEQUENCE_NAMES, BraTSCase, BraTSDataError, list_cases, load_case
from custom.data.dicom_series import SeriesMatchError
from custom.data.nifti import load_nifti, load_voxels
from custom.data.vocabulary import strip_nifti_suffix

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

class DicomConversionError(ValueError):
    """A volume or affine that cannot be written as a DICOM image plane, or a failed upload."""


# ------------------------------------------------------------------------------------ geometry


def plane_geometry(affine: np.ndarray, shape: Sequence[int]) -> dict:
    """DICOM image-plane attributes of a NIfTI volume: ``orientation`` (6), ``pixel_spacing``
    ``[row, column]``, ``slice_spacing``, ``positions`` (one LPS point a slice), ``normal``."""
    a = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    steps = a[:3, :3]
    spacing = np.linalg.norm(steps, axis=0)
    if np.any(spacing < 1e-6):
        raise DicomConversionError(f"degenerate affine (zero voxel size): {np.array2string(np.asarray(affine), precision=4)}")
    dirs = steps / spacing
    dots = [abs(float(dirs[:, x] @ dirs[:, y])) for x, y in ((0, 1), (0, 2), (1, 2))]
    if max(dots) > 1e-4:
        raise DicomConversionError(
            f"affine with sheared (non-orthogonal) voxel axes cannot be written as DICOM image planes "
            f"(|cos| between axes {max(dots):.2g}): {np.array2string(np.asarray(affine), precision=4)}"
        )
    row_dir, col_dir = dirs[:, 0], dirs[:, 1]  # along a row (increasing column = i), along a column (j)
    normal = np.cross(row_dir, col_dir)
    positions = [a[:3, 3] + steps[:, 2] * k for k in range(int(shape[2]))]
    return {
        "orientation": [*row_dir.tolist(), *col_dir.tolist()],
        "pixel_spacing": [float(spacing[1]), float(spacing[0])],
        "slice_spacing": float(spacing[2]),
        "positions": positions,
        "normal": normal,
    }


def _ds(value: float) -> str:
    """A DS (decimal string, at most 16 characters) for ``value``."""
    if abs(value) < 5e-11:
        return "0"
    for digits in range(12, 3, -1):
        s = f"{value:.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{value:.4e}"


def encode_voxels(volume: np.ndarray) -> tuple[np.ndarray, int, float, float]:
    """``(stored array, PixelRepresentation, RescaleSlope, RescaleIntercept)`` for ``volume``."""
    v = np.asarray(volume)
    if not np.all(np.isfinite(v)):
        raise DicomConversionError("volume holds NaN or infinite values")
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    integral = np.issubdtype(v.dtype, np.integer) or np.array_equal(v, np.round(v))
    if integral and lo >= 0 and hi <= 65535:
        return v.astype(np.uint16), 0, 1.0, 0.0
    if integral and lo >= -32768 and hi <= 32767:
        return v.astype(np.int16), 1, 1.0, 0.0
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.clip(np.round((v.astype(np.float64) - lo) / slope), 0, 65535).astype(np.uint16)
    return stored, 0, slope, lo


# --------------------------------------------------------------------------------------- writing


@dataclass
class SeriesInfo:
    modality: str
    series_uid: str
    description: str
    number: int
    files: list[str] = field(default_factory=list)


@dataclass
class StudyInfo:
    case_id: str
    study_uid: str
    frame_of_reference_uid: str
    patient_id: str
    series: dict[str, SeriesInfo]  # canonical modality -> series
    folder: str

    def to_json(self) -> dict:
        return {
            "case_id": self.case_id,
            "StudyInstanceUID": self.study_uid,
            "FrameOfReferenceUID": self.frame_of_reference_uid,
            "PatientID": self.patient_id,
            "folder": self.folder,
            "series": {m: {"SeriesInstanceUID": s.series_uid, "SeriesDescription": s.description, "SeriesNumber": s.number, "instances": len(s.files)}
                       for m, s in self.series.items()},
        }


def _content_hash(volumes: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for m in (m for m in MODALITIES if m in volumes):
        arr, affine = volumes[m]
        h.update(m.encode())
        h.update(str(arr.shape).encode() + str(arr.dtype).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
        h.update(np.asarray(affine, dtype=np.float64).tobytes())
    return h.hexdigest()


def _dicom_safe(text: str, limit: int = 64) -> str:
    return re.sub(r"[\\\x00-\x1f]", "_", text)[:limit]


def _window(volume: np.ndarray) -> tuple[float, float]:
    nz = volume[volume != 0]
    values = nz if nz.size else volume.ravel()
    if not values.size:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [0.5, 99.5])
    return float(lo + hi) / 2.0, float(max(hi - lo, 1.0))


def write_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    study: Dataset,
    series_uid: str,
    series_number: int,
    description: str,
    derivation: str = "",
) -> list[str]:
    """Write ``volume`` (H, W, D) as one MR series of D instances in ``out_dir``; ``study`` holds the
    patient / study / frame-of-reference attributes shared by the study's series. Returns the files."""
    if volume.ndim != 3:
        raise DicomConversionError(f"{description}: expected a 3D volume, got shape {volume.shape}")
    geom = plane_geometry(affine, volume.shape)
    stored, pixel_rep, slope, intercept = encode_voxels(volume)
    centre, width = _window(np.asarray(volume, dtype=np.float64) if slope != 1.0 else stored.astype(np.float64))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(volume.shape[2]):
        sop_uid = generate_uid(entropy_srcs=[series_uid, "instance", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = out / f"{series_number:02d}_{k + 1:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.update(study)
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.ProtocolName = description
        ds.SeriesDate, ds.SeriesTime = study.StudyDate, study.StudyTime
        ds.ContentDate, ds.ContentTime = study.StudyDate, study.StudyTime
        ds.InstanceNumber = k + 1
        ds.ImageType = ["DERIVED", "SECONDARY"]
        if derivation:
            ds.DerivationDescription = _dicom_safe(derivation, 1024)
        # MR Image module (type 1 / 2 attributes; the acquisition is unknown for converted data)
        ds.ScanningSequence = "RM"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = ""
        ds.EchoTime = ""
        ds.EchoTrainLength = ""
        # Image plane
        ds.ImageOrientationPatient = [_ds(x) for x in geom["orientation"]]
        ds.ImagePositionPatient = [_ds(x) for x in geom["positions"][k]]
        ds.PixelSpacing = [_ds(x) for x in geom["pixel_spacing"]]
        ds.SliceThickness = _ds(geom["slice_spacing"])
        ds.SpacingBetweenSlices = _ds(geom["slice_spacing"])
        ds.SliceLocation = _ds(float(geom["positions"][k] @ geom["normal"]))
        # Image pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = pixel_rep
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), _ds(intercept), "US"
        ds.WindowCenter, ds.WindowWidth = _ds(centre), _ds(width)
        ds.BurnedInAnnotation = "NO"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = j, columns = i
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)
        files.append(str(path))
    return files


def write_study(
    case: BraTSCase,
    volumes: Mapping[str, tuple[np.ndarray, np.ndarray]],
    out_dir: str | os.PathLike,
    *,
    patient_id: str | None = None,
    patient_name: str | None = None,
    study_date: datetime.datetime | None = None,
    one_grid: bool = True,
    descriptions: Mapping[str, str] | None = None,
) -> StudyInfo:
    """Write the case's volumes (four, or the sequences it has: FLAIR or T2 among them) as one study
    under ``out_dir/<case id>/<NN_modality>/`` (series numbers 1-4 in canonical order whatever is missing).
    ``one_grid``: refuse volumes on different grids (a BraTS case); False for a study as it comes from
    the scanner. ``descriptions``: SeriesDescription per modality (default ``SEQUENCE_NAMES``)."""
    present = [m for m in MODALITIES if m in volumes]
    if not any(m in volumes for m in REQUIRED_ANY):
        missing = [m for m in MODALITIES if m not in volumes]
        raise DicomConversionError(f"case {case.case_id}: missing modality {missing} (FLAIR or T2 is needed)")
    ref_shape, ref_affine = volumes[present[0]][0].shape, volumes[present[0]][1]
    for m in present[1:] if one_grid else []:
        arr, aff = volumes[m]
        if arr.shape != ref_shape or not np.allclose(aff, ref_affine, atol=1e-3):
            raise DicomConversionError(f"case {case.case_id}: {m} is not on the grid of {present[0]} (one frame of reference needs co-registered modalities)")
    digest = _content_hash(volumes)
    study_uid = generate_uid(entropy_srcs=[case.case_id, digest, "study"])
    for_uid = generate_uid(entropy_srcs=[case.case_id, digest, "frame-of-reference"])
    when = study_date or datetime.datetime.now()
    study = Dataset()
    study.SpecificCharacterSet = "ISO_IR 192"  # UTF-8
    study.PatientName = _dicom_safe(patient_name or case.case_id)
    study.PatientID = _dicom_safe(patient_id or case.case_id)
    study.PatientBirthDate = ""
    study.PatientSex = ""
    study.StudyInstanceUID = study_uid
    study.StudyID = digest[:8]
    study.StudyDate = when.strftime("%Y%m%d")
    study.StudyTime = when.strftime("%H%M%S")
    study.AccessionNumber = ""
    study.ReferringPhysicianName = ""
    study.StudyDescription = _dicom_safe(f"BraTS {case.case_id}")
    study.FrameOfReferenceUID = for_uid
    study.PositionReferenceIndicator = ""
    study.Manufacturer = "custom.dicom (NIfTI conversion)"
    study.BodyPartExamined = "BRAIN"
    study.PatientPosition = "HFS"
    folder = Path(out_dir) / case.case_id
    series = {}
    for number, m in enumerate(MODALITIES, start=1):
        if m not in volumes:
            continue
        arr, affine = volumes[m]
        uid = generate_uid(entropy_srcs=[case.case_id, digest, "series", m])
        source = case.images[0] if len(case.images) == 1 and case.complete else case.images[case.sequences.index(m)]
        description = _dicom_safe((descriptions or {}).get(m) or SEQUENCE_NAMES[m])
        files = write_series(
            arr, affine, folder / f"{number:02d}_{SEQUENCE_NAMES[m]}",
            study=study, series_uid=uid, series_number=number, description=description,
            derivation=f"{case.layout.name} case {case.case_id}, {m}, from {os.path.basename(source)}",
        )
        series[m] = SeriesInfo(m, uid, description, number, files)
    info = StudyInfo(case.case_id, study_uid, for_uid, study.PatientID, series, str(folder))
    (folder / "study.json").write_text(json.dumps(info.to_json(), indent=2) + "\n")
    return info


def convert_case(path: str | os.PathLike, out_dir: str | os.PathLike, case_id: str | None = None, **kwargs) -> StudyInfo:
    """``load_case`` + ``write_study``."""
    case, volumes = load_case(path, case_id)
    return write_study(case, volumes, out_dir, **kwargs)


def convert_study_folder(path: str | os.PathLike, out_dir: str | os.PathLike, case_id: str | None = None, **kwargs) -> StudyInfo:
    """A study as it comes from the scanner, as ``configs/clinical.json`` reads it (``<study>/<series>.nii.gz``,
    each series on its own grid, its sequence from the file name by the series rules), as one DICOM MR
    study whose SeriesDescriptions are the file names (of several files of one sequence the largest, as
    ``study_series`` chooses); raises ``SeriesMatchError`` when the names give no FLAIR or T2 file, or two
    files of one sequence of the same size."""
    from custom.preparation import study_series

    folder = Path(path)
    series = study_series(folder)
    present = tuple(m for m in MODALITIES if m in series)
    case = BraTSCase(case_id or folder.name, tuple(str(series[m]) for m in present), None, LAYOUTS["brats2021"], sequences=present)
    volumes = {}
    for m in present:
        img = load_nifti(series[m], case.case_id)
        volumes[m] = (np.asarray(load_voxels(img, str(series[m]), case.case_id)), img.affine)
    names = {m: strip_nifti_suffix(series[m].name) for m in present}
    return write_study(case, volumes, out_dir, one_grid=False, descriptions=names, **kwargs)


# ------------------------------------------------------------------------------------------ upload


def dicomweb_client(url: str, session=None):
    """A ``DICOMwebClient`` for ``url`` (e.g. ``http://127.0.0.1:8042/dicom-web``)."""
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=url.rstrip("/"), session=session)


def stow(files: Iterable[str], client_or_url, batch_size: int = 64) -> int:
    """Upload DICOM ``files`` with STOW-RS (batches of ``batch_size`` instances, one study per
    request). Returns the number of instances stored; raises ``DicomConversionError`` when the
    server reports failed instances."""
    client = dicomweb_client(client_or_url) if isinstance(client_or_url, str) else client_or_url
    by_study: dict[str, list[Dataset]] = {}
    for f in files:
        ds = pydicom.dcmread(f)
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    stored = 0
    for study_uid, datasets in by_study.items():
        for start in range(0, len(datasets), batch_size):
            batch = datasets[start : start + batch_size]
            response = client.store_instances(batch, study_instance_uid=study_uid)
            failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
            if failed:
                reasons = sorted({str(getattr(item, "FailureReason", "?")) for item in failed})
                raise DicomConversionError(f"STOW-RS to {client.base_url}: {len(failed)} of {len(batch)} instances refused (FailureReason {reasons})")
            stored += len(batch)
    return stored


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.nifti_to_dicom CASE --out DIR [--stow URL]``: a BraTS case as a DICOM MR study."""
    parser = argparse.ArgumentParser(prog="python -m tools.nifti_to_dicom", description=main.__doc__)
    parser.add_argument("path", help="a BraTS 2021/2023 case folder, a 4D MSD image, a dataset folder (with --case), "
                                     "or with --study a study folder of series on their own grids")
    parser.add_argument("--study", action="store_true", help="PATH is a study as it comes from the scanner (<series>.nii.gz, "
                                                             "sequences from the file names, as configs/clinical.json reads it)")
    parser.add_argument("--case", action="append", help="case id inside a dataset folder (repeatable; 'all' for every case)")
    parser.add_argument("--out", required=True, help="output folder; the study goes to OUT/<case id>/")
    parser.add_argument("--stow", metavar="URL", help="DICOMweb root to upload to with STOW-RS, e.g. http://127.0.0.1:8042/dicom-web")
    parser.add_argument("--patient-id", help="PatientID (default: the case id)")
    args = parser.parse_args(argv)
    try:
        if args.study:
            ids = [None]
        elif args.case == ["all"]:
            ids = [c.case_id for c in list_cases(args.path, check="none")]
        else:
            ids = args.case or [None]
        for cid in ids:
            if args.study:
                info = convert_study_folder(args.path, args.out, patient_id=args.patient_id)
            else:
                info = convert_case(args.path, args.out, cid, patient_id=args.patient_id)
            n = sum(len(s.files) for s in info.series.values())
            print(f"{info.case_id}: StudyInstanceUID {info.study_uid}, {len(info.series)} series, {n} instances in {info.folder}", flush=True)
            if args.stow:
                stored = stow([f for s in info.series.values() for f in s.files], args.stow)
                print(f"{info.case_id}: {stored} instances stored at {args.stow}", flush=True)
    except (BraTSDataError, DicomConversionError, SeriesMatchError) as e:
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
