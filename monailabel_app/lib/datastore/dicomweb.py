"""MONAI Label datastore for BraTS studies in a PACS (DICOMweb, e.g. Orthanc): one image = one MR
study's modality series (T1, T1ce, T2, FLAIR, or those it has: FLAIR or T2 among them), results
stored back as DICOM SEG.

``--studies http://127.0.0.1:8042/dicom-web``. MONAI Label's own ``DICOMWebDatastore`` makes every
series one image; a BraTS network needs the four co-registered modalities of a study at once. Here:

- **Series matching.** QIDO-RS lists the MR series (``Modality=MR``; MONAI Label's
  ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` defaults to CT and is forced to MR, other keys of it are
  kept) and groups them by study. Each series' SeriesDescription is matched against per-modality
  regular expressions (``custom.data.dicom_series.SERIES_RULES``: "T1", "T1w", "t1n", "MPRAGE" -> T1; "T1ce",
  "t1c", "T1 post Gd", "T1+C" -> T1ce; "T2", "T2w" -> T2; "FLAIR", "T2 FLAIR", "t2f" -> FLAIR),
  replaced per modality with ``--conf dicomweb_series_rules '{"t1ce":"post"}'`` (JSON without
  spaces, or the path of a JSON file); of several series of one modality the one with the most
  instances is used (``match_series``). A study is an image when FLAIR or T2 has a series (the
  model accepts any subset of the four sequences that contains FLAIR or T2; missing ones are
  zero-filled by the bundle's loader and the inference result's ``sequences`` names those used);
  other studies (no FLAIR and no T2, or two series of one modality with the same number of
  instances) are left out of the image list, and asking for them answers HTTP 422 with every
  series found and what it matched.
- **Image id = the FLAIR series' SeriesInstanceUID** (the T2's when the study has no FLAIR: the
  series annotators draw on, what ``GET /datastore/image`` serves and what the DICOM SEG references
  first). The study's StudyInstanceUID and the other series' UIDs are accepted wherever an image id
  is (OHIF sends the UID of the series on screen) and resolve to it.
- **Model input** (``model_input``, ``model_sequences``): the study's series are retrieved with WADO-RS into the cache
  (``MONAI_LABEL_DICOMWEB_CACHE_PATH`` or ``~/.cache/monailabel/dicom/<hash of the URL>``,
  ``series/<SeriesInstanceUID>/``; fetched again when the PACS holds a different number of
  instances), converted with SimpleITK/GDCM to NIfTI (``series/<uid>.nii.gz``, LPS -> RAS handled
  by ITK) and returned as paths in the canonical order T1, T1ce, T2, FLAIR. Series on one grid
  (BraTS-style co-registered) are used as they are. Series on different grids (a study as it comes
  from the scanner: own orientation, voxel size, pose; skull present) are prepared first
  (``custom.preparation.prepare_study``: rigid mutual-information registration onto the reference
  series, T1ce, else FLAIR, else T1, else T2, brain extraction on it, a grid of ``--conf
  dicomweb_prepared_spacing`` mm, default 1, N4 on T1, T1ce and T2), cached in ``prepared/<image id>/``; the inference
  result is carried back onto the display series' grid through the display series' registration
  (``result_on_image``) before it is returned or stored, and training gets the final labels carried
  onto the prepared grid. HTTP 422 when a study cannot be prepared (the message names the step).
- **Labels** (``save_label``: the infer task with ``save_label``, ``PUT /datastore/label``, OHIF's
  label.bin, Slicer's NIfTI with ``label_info``): checked like the NIfTI datastores (FLAIR grid, the
  label convention's values; 415/422), written as a DICOM SEG with pydicom-seg (one segment per
  label present, numbered 1..n, SegmentLabel = the label name, e.g. "necrotic tumour core",
  SegmentDescription NCR/ED/ET, SNOMED CT codes, display colours), referencing the FLAIR series
  first, then T1, T1ce, T2 (ReferencedSeriesSequence), same StudyInstanceUID and
  FrameOfReferenceUID, SeriesDescription ``BraTS segmentation (<tag>)``, ContentLabel = the tag;
  stored with STOW-RS and kept in the local cache. An all-background label cannot be a SEG (no
  segment): it is kept locally only (``dicom_seg`` null in the label info).
- **Labelled images**: a SEG in the PACS referencing the FLAIR series whose SeriesDescription
  does not end in ``(original)`` (MONAI Label's tag for unreviewed model output) is that image's
  final label; ``get_label_uri(.., "final")`` decodes the newest one into the FLAIR grid with the
  convention's values (SegmentLabel -> value); ``datalist()`` gives training the four-modality
  inputs with these labels.
- Label convention of results (``--conf dicomweb_label_convention``): ``brats2023`` (default: 1
  NCR, 2 ED, 3 ET; OHIF numbers segments 1..3 in /info order, which then coincide) or
  ``brats2021`` (ET = 4).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from custom.data import LAYOUTS, MODALITIES, SEQUENCE_NAMES, Layout
from custom.data.dicom_files import dicom_to_nifti
from custom.data.dicom_series import SeriesMatchError, match_series, parse_rules
from custom.preparation import PreparationError, default_reference, map_from_reference, map_to_reference, prepare_study
from custom.preparation.study import N4_SEQUENCES, REVISION
from lib.datastore.brats import check_label_file

logger = logging.getLogger(__name__)

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
ORIGINAL_SUFFIX = f"({DefaultLabelTag.ORIGINAL})"
SEG_SERIES_NUMBER = 100
COLOURS = {"ncr": (255, 255, 0), "ed": (0, 200, 0), "et": (220, 0, 0)}  # as lib.infers.brats_bundle
ABBREVIATIONS = {"ncr": "NCR", "ed": "ED", "et": "ET"}
# SNOMED CT: category "Morphologically altered structure"; types necrosis / oedema / neoplasm.
CATEGORY = {"CodeValue": "49755003", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Morphologically Altered Structure"}
TYPES = {
    "ncr": {"CodeValue": "6574001", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Necrosis"},
    "ed": {"CodeValue": "79654002", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Edema"},
    "et": {"CodeValue": "108369006", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Neoplasm"},
}
SERIES_FIELDS = ["StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription", "SeriesNumber", "Modality", "NumberOfSeriesRelatedInstances",
                 "SeriesDate", "SeriesTime"]


def _value(item: dict, keyword: str, default: Any = None) -> Any:
    """A value of a DICOM JSON (QIDO-RS) item by keyword."""
    tag = f"{pydicom.datadict.tag_for_keyword(keyword):08X}"
    values = (item.get(tag) or {}).get("Value")
    if not values:
        return default
    v = values[0]
    return v.get("Alphabetic", default) if isinstance(v, dict) else v


@dataclass(frozen=True)
class Study:
    study_uid: str
    series: Dict[str, dict]  # canonical modality -> {"SeriesInstanceUID", "SeriesDescription", "SeriesNumber", "instances"}

    @property
    def display(self) -> str:
        """The modality annotators see and the image id names: FLAIR, else T2."""
        return "flair" if "flair" in self.series else "t2"

    @property
    def image_id(self) -> str:
        return self.series[self.display]["SeriesInstanceUID"]

    @property
    def sequences(self) -> List[str]:
        """The modalities the study has, canonical order."""
        return [m for m in MODALITIES if m in self.series]


class BraTSDICOMwebDatastore(DICOMWebDatastore):
    """Four-series BraTS studies of a DICOMweb server as MONAI Label images (see the module doc)."""

    def __init__(self, client, search_filter: Dict[str, Any], layout: Layout, rules=None, cache_path: Optional[str] = None, list_ttl: float = 30.0,
                 prepared_spacing: float = 1.0):
        self.layout = layout
        self.prepared_spacing = float(prepared_spacing)
        self.convention = layout.convention
        self.rules = parse_rules(rules)
        self.list_ttl = float(list_ttl)
        filt = dict(search_filter or {})
        if str(filt.get("Modality", "")).upper() != "MR":
            logger.warning(f"MONAI_LABEL_DICOMWEB_SEARCH_FILTER {search_filter} does not select MR; BraTS studies are MR: using Modality=MR")
            filt["Modality"] = "MR"
        self.search_filter = filt
        self._index_lock = threading.Lock()
        self._index: Optional[dict] = None
        self._index_ts = 0.0
        self._series_locks: Dict[str, threading.Lock] = {}
        self._seg_refs: Dict[str, Optional[str]] = {}  # SEG series uid -> referenced (first) series uid
        super().__init__(client, filt, cache_path=cache_path, fetch_by_frame=False, convert_to_nifti=True)
        self._series_dir = os.path.join(self._datastore_path, "series")
        self._prepared_dir = os.path.join(self._datastore_path, "prepared")
        os.makedirs(self._series_dir, exist_ok=True)
        logger.info(f"BraTS DICOMweb datastore {client.base_url}: filter {filt}, cache {self._datastore_path}, labels {self.convention.name}")

    def name(self) -> str:
        return f"BraTS studies at {self._client.base_url}"

    # -- study index ---------------------------------------------------------------------------------
    def _scan(self) -> dict:
        series = self._client.search_for_series(search_filters=self.search_filter, fields=SERIES_FIELDS, get_remaining=True)
        by_study: Dict[str, List[dict]] = {}
        for item in series:
            entry = {
                "SeriesInstanceUID": str(_value(item, "SeriesInstanceUID", "")),
                "SeriesDescription": str(_value(item, "SeriesDescription", "") or ""),
                "SeriesNumber": _value(item, "SeriesNumber", ""),
                "Modality": str(_value(item, "Modality", "")),
                "instances": int(_value(item, "NumberOfSeriesRelatedInstances", 0) or 0),
            }
            by_study.setdefault(str(_value(item, "StudyInstanceUID", "")), []).append(entry)
        studies: Dict[str, Study] = {}
        problems: Dict[str, str] = {}
        alias: Dict[str, str] = {}
        for study_uid, items in by_study.items():
            try:
                matched = match_series(items, self.rules, f"study {study_uid}", allow_missing=True)
            except SeriesMatchError as e:
                problems[study_uid] = str(e)
                for s in items:
                    problems[s["SeriesInstanceUID"]] = str(e)
                continue
            study = Study(study_uid, {m: dict(s) for m, s in matched.items()})
            studies[study.image_id] = study
            alias[study_uid] = study.image_id
            for s in items:
                alias[s["SeriesInstanceUID"]] = study.image_id
        if problems:
            logger.info(f"{len({k for k in problems if k in by_study})} MR studies without FLAIR or T2 series "
                        f"(or with two series of one modality of the same size) are not listed")
        return {"studies": studies, "alias": alias, "problems": problems}

    def _studies(self, refresh: bool = False) -> dict:
        with self._index_lock:
            if refresh or self._index is None or time.monotonic() - self._index_ts > self.list_ttl:
                self._index = self._scan()
                self._index_ts = time.monotonic()
            return self._index

    def study(self, image_id: str) -> Study:
        return self._studies()["studies"][self.require_image(image_id)]

    def list_images(self) -> List[str]:
        return sorted(self._studies()["studies"])

    def require_image(self, image_id: Any) -> str:
        """The image id (FLAIR SeriesInstanceUID) of ``image_id`` = that id, the StudyInstanceUID or
        another modality's SeriesInstanceUID. HTTP 400 (not a UID), 404 (unknown), 422 (a study
        without exactly one series per modality: the message lists its series)."""
        if not isinstance(image_id, str) or len(image_id) > 64 or not UID.match(image_id):
            raise HTTPException(status_code=400,
                                detail=f"invalid image id {str(image_id)[:80]!r}: expected a DICOM UID (digits and dots, at most 64 characters)")
        for refresh in (False, True):
            index = self._studies(refresh=refresh)
            if image_id in index["alias"]:
                return index["alias"][image_id]
            if image_id in index["problems"]:
                raise HTTPException(status_code=422, detail=index["problems"][image_id])
        raise HTTPException(status_code=404,
                            detail=f"no MR series or study {image_id!r} at {self._client.base_url} (GET /datastore/?output=all lists the images)")

    # -- series cache ----------------------------------------------------------------------------------
    def _lock_for(self, key: str) -> threading.Lock:
        with self._index_lock:
            return self._series_locks.setdefault(key, threading.Lock())

    def series_files(self, study_uid: str, series: dict) -> List[str]:
        """The series' DICOM files in the cache (retrieved with WADO-RS when missing or when the PACS
        holds a different number of instances)."""
        uid = series["SeriesInstanceUID"]
        folder = os.path.join(self._series_dir, uid)
        with self._lock_for(uid):
            files = sorted(str(p) for p in pathlib.Path(folder).glob("*.dcm")) if os.path.isdir(folder) else []
            if files and (not series.get("instances") or len(files) == series["instances"]):
                return files
            start = time.monotonic()
            tmp = f"{folder}.{uuid.uuid4().hex}.tmp"
            os.makedirs(tmp)
            try:
                for ds in self._client.retrieve_series(study_uid, uid):
                    ds.save_as(os.path.join(tmp, f"{ds.SOPInstanceUID}.dcm"))
                shutil.rmtree(folder, ignore_errors=True)
                stale = os.path.join(self._series_dir, f"{uid}.nii.gz")
                if os.path.exists(stale):
                    os.remove(stale)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            files = sorted(str(p) for p in pathlib.Path(folder).glob("*.dcm"))
            logger.info(f"Retrieved series {uid} ({series.get('SeriesDescription')!r}): {len(files)} instances in {time.monotonic() - start:.1f} s")
            return files

    def series_nifti(self, study_uid: str, series: dict) -> str:
        """The series as a NIfTI file in the cache (SimpleITK/GDCM: slices sorted by position)."""
        files = self.series_files(study_uid, series)
        uid = series["SeriesInstanceUID"]
        out = os.path.join(self._series_dir, f"{uid}.nii.gz")
        with self._lock_for(uid):
            if os.path.exists(out):
                return out
            described = {**series, "files": files, "path": os.path.dirname(files[0])}
            try:
                return os.fspath(dicom_to_nifti(described, pathlib.Path(out)))
            except SeriesMatchError as e:
                raise HTTPException(status_code=422, detail=str(e)) from e

    def model_input(self, image_id: str) -> List[str]:
        """The modality volumes of ``image_id`` (those the study has, see ``model_sequences``) as NIfTI
        paths, canonical order T1, T1ce, T2, FLAIR: the series themselves when they share one grid,
        else the study prepared (``prepared_study``)."""
        study = self.study(image_id)
        sequences = study.sequences
        paths = [self.series_nifti(study.study_uid, study.series[m]) for m in sequences]
        grids = [nib.load(p) for p in paths]
        ref = grids[sequences.index(study.display)]
        if len(sequences) < len(MODALITIES):
            logger.info(f"study {study.study_uid}: series for {', '.join(SEQUENCE_NAMES[m] for m in sequences)} only")
        if all(g.shape[:3] == ref.shape[:3] and np.allclose(g.affine, ref.affine, atol=1e-3) for g in grids):
            return paths
        report = self.prepared_study(image_id)
        folder = os.path.join(self._prepared_dir, study.image_id)
        return [os.path.join(folder, report["series"][m]["output"]) for m in sequences]

    def prepared_study(self, image_id: str) -> Optional[dict]:
        """The preparation report of a study whose series lie on different grids (None when they share
        one): every series registered rigidly onto the reference series (``prepare_study``'s default:
        T1ce, else FLAIR, else T1, else T2; a 3D T1ce is usually the finest series), brain extracted on it,
        resampled to ``prepared_spacing`` mm (``custom.preparation.prepare_study``), cached in
        ``prepared/<image id>/`` until a series changes. Labels lie on the display series: results
        reach it through its registration (``result_on_image``).
        HTTP 422 when the study cannot be prepared (no overlap, poor registration, no brain)."""
        study = self.study(image_id)
        sequences = study.sequences
        paths = {m: self.series_nifti(study.study_uid, study.series[m]) for m in sequences}
        grids = {m: nib.load(p) for m, p in paths.items()}
        ref = grids[study.display]
        if all(g.shape[:3] == ref.shape[:3] and np.allclose(g.affine, ref.affine, atol=1e-3) for g in grids.values()):
            return None
        folder = os.path.join(self._prepared_dir, study.image_id)
        key = {m: [study.series[m]["SeriesInstanceUID"], os.path.getmtime(p)] for m, p in paths.items()}
        key["spacing_mm"] = self.prepared_spacing
        key["reference"] = default_reference(paths)
        key["bias_correction"] = list(N4_SEQUENCES)  # in the key: a preparation cached with other settings is redone
        key["revision"] = REVISION
        with self._lock_for(f"prepared:{study.image_id}"):
            report_file = os.path.join(folder, "preparation.json")
            if os.path.exists(report_file):
                cached = json.loads(pathlib.Path(report_file).read_text())
                if cached.get("key") == json.loads(json.dumps(key)):
                    return cached["report"]
            grid_text = "; ".join(f"{SEQUENCE_NAMES[m]} {study.series[m]['SeriesDescription']!r}: shape {g.shape[:3]}, "
                                  f"voxel {np.round(g.header.get_zooms()[:3], 3).tolist()} mm" for m, g in grids.items())
            logger.info(f"study {study.study_uid}: series on different grids ({grid_text}): preparing onto {SEQUENCE_NAMES[key['reference']]}, "
                        f"results on {SEQUENCE_NAMES[study.display]}")
            tmp = f"{folder}.{uuid.uuid4().hex}.tmp"
            try:
                report = prepare_study(paths, tmp, reference=key["reference"], bias_correction=key["bias_correction"], case_id="study",
                                       spacing=self.prepared_spacing)
                pathlib.Path(tmp, "preparation.json").write_text(json.dumps({"key": key, "report": report}))
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            except PreparationError as e:
                raise HTTPException(status_code=422, detail=f"study {study.study_uid}: its series lie on different grids and cannot be "
                                                            f"co-registered ({e}); {grid_text}") from e
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            regs = ", ".join(f"{SEQUENCE_NAMES[m]} {r['registration']['rotation_total_deg']:.1f} deg MI {r['registration']['mutual_information']}"
                             for m, r in report["series"].items() if m != key["reference"])
            logger.info(f"study {study.study_uid}: prepared in {report['seconds']:.1f} s (brain {report['brain']['volume_ml']:.0f} mL, "
                        f"{report['brain']['method']}; registered {regs})")
            return report

    def result_on_image(self, image_id: str, result_file: str, continuous: bool = False) -> str:
        """An inference result on the model input's grid as a file on the image's (display series') grid:
        ``result_file`` itself when the study needed no preparation, else resampled (labels label by label,
        ``continuous`` maps such as uncertainty trilinearly) into a new file beside it."""
        report = self.prepared_study(image_id)
        if report is None:
            return result_file
        out = re.sub(r"(\.nii)?(\.gz)?$", "", result_file) + "_on_image.nii.gz"
        map_to_reference(result_file, report, out, order=1 if continuous else 0, series=self.study(image_id).display)
        return out

    def model_sequences(self, image_id: str) -> List[str]:
        """Names of the modalities in ``model_input`` (canonical order; the others are missing)."""
        return self.study(image_id).sequences

    # -- the image a client downloads: the FLAIR ---------------------------------------------------------
    def get_image_uri(self, image_id: str) -> str:
        flair = self.require_image(image_id)
        uri = LocalDatastore.get_image_uri(self, flair)
        if uri and os.path.exists(uri):
            return uri
        study = self.study(flair)
        src = self.series_nifti(study.study_uid, study.series[study.display])
        info = {
            "SeriesInstanceUID": flair,
            "StudyInstanceUID": study.study_uid,
            "Modality": "MR",
            "series": {SEQUENCE_NAMES[m]: s["SeriesInstanceUID"] for m, s in study.series.items()},
        }
        passed_over = {SEQUENCE_NAMES[m]: s["passed_over"] for m, s in study.series.items() if s.get("passed_over")}
        if passed_over:  # the other series that matched a sequence, smaller than the one used
            info["passed_over"] = passed_over
        LocalDatastore.add_image(self, flair, src, info)
        return LocalDatastore.get_image_uri(self, flair)

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        flair = self.require_image(image_id)
        self.get_image_uri(flair)
        return LocalDatastore.get_image_info(self, flair)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        flair = self.require_image(image_id)
        self.get_image_uri(flair)
        LocalDatastore.update_image_info(self, flair, info)

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        raise HTTPException(status_code=405, detail="images come from the PACS: upload DICOM studies to it "
                                                    "(e.g. python -m tools.nifti_to_dicom CASE --out DIR --stow URL)")

    def remove_image(self, image_id: str) -> None:
        raise HTTPException(status_code=403, detail="images are never deleted through this server: delete studies in the PACS")

    # -- labels -> DICOM SEG ---------------------------------------------------------------------------------
    def _segment_meta(self) -> Dict[int, dict]:
        """Label value -> name, abbreviation, colour and codes, in label-value order."""
        c = self.convention
        meaning = {c.ncr: "ncr", c.ed: "ed", c.et: "et"}
        return {v: {"name": c.names[v], "meaning": meaning[v]} for v in sorted(c.names)}

    def write_seg(self, image_id: str, label_file: str, tag: str, model: str = "") -> Optional[Dataset]:
        """A DICOM SEG of the label map ``label_file`` (NIfTI in the FLAIR grid, convention values),
        or None when it holds no label."""
        import pydicom_seg

        study = self.study(image_id)
        flair_files = self.series_files(study.study_uid, study.series[study.display])
        label = sitk.ReadImage(label_file)
        values = sitk.GetArrayFromImage(label)
        meta = self._segment_meta()
        present = [v for v in meta if np.any(values == v)]
        if not present:
            return None
        segments = np.zeros(values.shape, np.uint8)
        attributes = []
        for number, v in enumerate(present, start=1):  # SegmentNumber 1..n, no gaps
            segments[values == v] = number
            m = meta[v]
            attributes.append(
                {
                    "labelID": number,
                    "SegmentLabel": m["name"],
                    "SegmentDescription": ABBREVIATIONS[m["meaning"]],
                    "SegmentAlgorithmType": "AUTOMATIC" if tag == DefaultLabelTag.ORIGINAL else "SEMIAUTOMATIC",
                    "SegmentAlgorithmName": f"MONAI Label {model}".strip()[:64],
                    "SegmentedPropertyCategoryCodeSequence": CATEGORY,
                    "SegmentedPropertyTypeCodeSequence": TYPES[m["meaning"]],
                    "recommendedDisplayRGBValue": list(COLOURS[m["meaning"]]),
                }
            )
        mask = sitk.GetImageFromArray(segments)
        mask.CopyInformation(label)
        template = pydicom_seg.template.from_dcmqi_metainfo(
            {
                "ContentCreatorName": "MONAI Label",
                "ClinicalTrialSeriesID": "Session1",
                "ClinicalTrialTimePointID": "1",
                "SeriesDescription": f"BraTS segmentation {'(' + tag + ')'}"[:64],
                "SeriesNumber": str(SEG_SERIES_NUMBER),
                "InstanceNumber": "1",
                "ContentLabel": re.sub(r"[^A-Z0-9_ ]", "_", tag.upper())[:16] or "SEGMENTATION",
                "ContentDescription": f"MONAI Label {model} {tag}".strip()[:64],
                "BodyPartExamined": "BRAIN",
                "segmentAttributes": [attributes],
            }
        )
        writer = pydicom_seg.MultiClassWriter(template=template, inplane_cropping=False, skip_empty_slices=False, skip_missing_segment=False)
        source = [pydicom.dcmread(f, stop_before_pixels=True) for f in flair_files]
        frame_of_reference = str(source[0].FrameOfReferenceUID)
        charset = source[0].get("SpecificCharacterSet", "ISO_IR 100")
        seg = writer.write(mask, source)
        # pydicom-seg 0.4 imports the source's FrameOfReferenceUID element (the same object), then sets
        # a new UID on it, and resets the character set: restore both
        seg.FrameOfReferenceUID = frame_of_reference
        seg.SpecificCharacterSet = charset
        seg.Manufacturer = "MONAI Label"
        seg.ManufacturerModelName = f"BraTS app {model}".strip()
        seg.SeriesDescription = f"BraTS segmentation ({tag})"[:64]
        # reference the other modalities of the study too (the segmentation was computed from all of them)
        for m in (m for m in study.sequences if m != study.display):
            item = Dataset()
            item.SeriesInstanceUID = study.series[m]["SeriesInstanceUID"]
            item.ReferencedInstanceSequence = []
            for f in self.series_files(study.study_uid, study.series[m]):
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                ref = Dataset()
                ref.ReferencedSOPClassUID = ds.SOPClassUID
                ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
                item.ReferencedInstanceSequence.append(ref)
            seg.ReferencedSeriesSequence.append(item)
        return seg

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any], label_id: str = "") -> str:
        """Check the label (FLAIR grid, convention values), store it as a DICOM SEG in the PACS and in
        the local cache; returns the image id (= label id)."""
        flair = self.require_image(image_id)
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", str(label_tag or "")):
            raise HTTPException(status_code=400, detail=f"invalid label tag {str(label_tag)[:40]!r}")
        image_uri = self.get_image_uri(flair)
        label_info = dict(label_info or {})
        cleanup = []
        try:
            if label_filename.endswith(".bin"):  # OHIF: raw voxels in the image's order
                label_filename = binary_to_image(image_uri, label_filename)
                cleanup.append(label_filename)
            elif not label_filename.endswith((".nii.gz", ".nii")):
                raise HTTPException(status_code=415,
                                    detail=f"labels must be NIfTI (.nii.gz, .nii) or OHIF's label.bin, got {os.path.basename(label_filename)!r}")
            ref = nib.load(image_uri)
            where = f"label for image {flair}"
            remapped = check_label_file(label_filename, ref.shape[:3], ref.affine, self.convention, where, label_info.get("label_info"))
            data = remapped if remapped is not None else np.asanyarray(nib.load(label_filename).dataobj).reshape(ref.shape[:3])
            checked = os.path.join(tempfile.gettempdir(), f"label-{uuid.uuid4().hex}.nii.gz")
            nib.save(nib.Nifti1Image(np.asarray(data).astype(np.uint8), ref.affine), checked)
            cleanup.append(checked)
            seg = self.write_seg(flair, checked, label_tag, str(label_info.get("model") or ""))
            if seg is None:
                logger.warning(f"label {label_tag!r} of {flair} holds no segment: kept locally, no DICOM SEG stored")
                label_info["dicom_seg"] = None
            else:
                start = time.monotonic()
                self._client.store_instances([seg], study_instance_uid=str(seg.StudyInstanceUID))
                self._seg_refs[str(seg.SeriesInstanceUID)] = flair
                label_info["dicom_seg"] = {"SeriesInstanceUID": str(seg.SeriesInstanceUID), "SOPInstanceUID": str(seg.SOPInstanceUID),
                                           "StudyInstanceUID": str(seg.StudyInstanceUID)}
                logger.info(f"DICOM SEG {seg.SeriesInstanceUID} ({label_tag}) of {flair} stored in {time.monotonic() - start:.1f} s")
            label_info.pop("label_info", None)
            return LocalDatastore.save_label(self, flair, checked, label_tag, label_info)
        finally:
            for f in cleanup:
                if os.path.exists(f):
                    os.remove(f)

    # -- labels from the PACS ------------------------------------------------------------------------------
    def _segs(self) -> Dict[str, List[dict]]:
        """FLAIR series uid -> the final-label SEG series referencing it, newest first."""
        items = self._client.search_for_series(search_filters={"Modality": "SEG"}, fields=SERIES_FIELDS, get_remaining=True)
        out: Dict[str, List[dict]] = {}
        for item in items:
            uid = str(_value(item, "SeriesInstanceUID", ""))
            if str(_value(item, "SeriesDescription", "") or "").strip().endswith(ORIGINAL_SUFFIX):
                continue  # unreviewed model output
            if uid not in self._seg_refs:
                meta = self._client.retrieve_series_metadata(str(_value(item, "StudyInstanceUID", "")), uid)
                header = {k: v for k, v in meta[0].items() if k != "7FE00010"} if meta else None  # no pixel data (bulk data URI)
                ref = Dataset.from_json(header).get("ReferencedSeriesSequence") if header else None
                self._seg_refs[uid] = str(ref[0].SeriesInstanceUID) if ref else None
            target = self._studies()["alias"].get(self._seg_refs[uid] or "")
            if target:
                when = f"{_value(item, 'SeriesDate', '') or ''}{_value(item, 'SeriesTime', '') or ''}"
                out.setdefault(target, []).append({"SeriesInstanceUID": uid, "StudyInstanceUID": str(_value(item, "StudyInstanceUID", "")), "when": when})
        for v in out.values():
            v.sort(key=lambda s: s["when"], reverse=True)
        return out

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        if label_tag not in (None, DefaultLabelTag.FINAL):
            return LocalDatastore.get_labeled_images(self, label_tag, labels)
        return sorted(set(self._segs()) & set(self.list_images()))

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return sorted(set(self.list_images()) - set(self.get_labeled_images(label_tag, labels)))

    def read_seg(self, seg_file: str, image_id: str) -> np.ndarray:
        """A SEG decoded into the FLAIR grid of ``image_id``: a label map with the convention's values
        (segments matched by SegmentLabel, else by SegmentDescription NCR/ED/ET)."""
        import pydicom_seg

        result = pydicom_seg.SegmentReader().read(pydicom.dcmread(seg_file))
        ref = sitk.ReadImage(self.get_image_uri(image_id))
        by_name = {m["name"].lower(): v for v, m in self._segment_meta().items()}
        by_abbrev = {ABBREVIATIONS[m["meaning"]].lower(): v for v, m in self._segment_meta().items()}
        out = np.zeros(sitk.GetArrayFromImage(ref).shape, np.uint8)
        for number, info in result.segment_infos.items():
            value = by_name.get(str(getattr(info, "SegmentLabel", "")).lower()) or by_abbrev.get(str(getattr(info, "SegmentDescription", "")).lower())
            if value is None:
                logger.warning(f"SEG segment {number} {getattr(info, 'SegmentLabel', '')!r} is none of {sorted(by_name)}: ignored")
                continue
            mask = sitk.Resample(result.segment_image(number), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            out[sitk.GetArrayFromImage(mask) > 0] = value
        return np.transpose(out, (2, 1, 0))  # ITK (z, y, x) -> NIfTI (i, j, k)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        flair = self.require_image(image_id or label_id)
        if label_tag != DefaultLabelTag.FINAL:
            return LocalDatastore.get_label_uri(self, flair, label_tag)
        segs = self._segs().get(flair)
        if not segs:
            return LocalDatastore.get_label_uri(self, flair, label_tag)
        newest = segs[0]
        current = LocalDatastore.get_label_info(self, flair, label_tag) or {}
        if (current.get("dicom_seg") or {}).get("SeriesInstanceUID") != newest["SeriesInstanceUID"]:
            folder = os.path.join(self._datastore_path, "segs", newest["SeriesInstanceUID"])
            if not os.path.isdir(folder) or not os.listdir(folder):
                os.makedirs(folder, exist_ok=True)
                for ds in self._client.retrieve_series(newest["StudyInstanceUID"], newest["SeriesInstanceUID"]):
                    ds.save_as(os.path.join(folder, f"{ds.SOPInstanceUID}.dcm"))
            data = self.read_seg(os.path.join(folder, sorted(os.listdir(folder))[0]), flair)
            tmp = os.path.join(tempfile.gettempdir(), f"seg-{uuid.uuid4().hex}.nii.gz")
            try:
                nib.save(nib.Nifti1Image(data, nib.load(self.get_image_uri(flair)).affine), tmp)
                LocalDatastore.save_label(self, flair, tmp, label_tag, {"dicom_seg": newest, "source": "PACS"})
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return LocalDatastore.get_label_uri(self, flair, label_tag)

    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        """Final labels of the PACS with their inputs and sequence names (for the train task)."""
        items = []
        for i in self.get_labeled_images():
            label = self.get_label_uri(i, DefaultLabelTag.FINAL)
            report = self.prepared_study(i)
            if report is not None:  # the label lies on the display series: onto the prepared grid
                study = self.study(i)
                label = os.fspath(map_from_reference(label, report, os.path.join(self._prepared_dir, study.image_id, "final_label.nii.gz"),
                                                     series=study.display))
            items.append({"image": self.model_input(i), "label": label, "sequences": self.model_sequences(i)})
        return items


def open_dicomweb_datastore(url: str, conf: Dict[str, str]) -> tuple[BraTSDICOMwebDatastore, Layout]:
    """The datastore for ``--studies URL`` and the layout the app passes to the bundle (canonical
    per-modality channel order; the ``dicomweb_label_convention`` label values)."""
    url = url.rstrip("/").strip()
    convention = conf.get("dicomweb_label_convention", "brats2023")
    if convention not in ("brats2021", "brats2023"):
        raise ValueError(f"--conf dicomweb_label_convention must be brats2021 or brats2023, got {convention!r}")
    layout = LAYOUTS[convention]
    user = settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME
    password = settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD
    session = None
    if user and password:
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(user, password)
    client = DICOMwebClientX(
        url=url,
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    cache = (settings.MONAI_LABEL_DATASTORE_CACHE_PATH or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
    datastore = BraTSDICOMwebDatastore(
        client,
        settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
        layout,
        rules=conf.get("dicomweb_series_rules") or None,
        cache_path=cache,
        list_ttl=float(conf.get("dicomweb_list_ttl", 30)),
        prepared_spacing=float(conf.get("dicomweb_prepared_spacing", 1.0)),
    )
    return datastore, layout
