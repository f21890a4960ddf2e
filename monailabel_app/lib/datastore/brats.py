"""MONAI Label datastores for BraTS studies: checked label uploads, atomic writes, read-only datasets.

Two flavours, chosen by :func:`open_datastore` from what ``--studies`` holds:

- :class:`CheckedLocalDatastore`: MONAI Label's ``LocalDatastore`` over a flat folder of 4D NIfTI
  images (MSD Task01 style, one ``(H, W, D, 4)`` file a case; image id = file name without
  ``.nii.gz``);
- :class:`BraTSDatastore`: a dataset folder that ``custom.data`` detects (BraTS 2021 or 2023 case
  folders, or an MSD Task01 folder with ``dataset.json``). Image id = case id. The dataset is never
  written: a case's segmentation file (``*_seg.nii.gz``, ``labelsTr/``) counts as its ``final``
  label until a client saves one, and saved labels go to ``<studies>/labels/<tag>/<id>.nii.gz``
  like MONAI Label's own datastore.

What a client downloads for an image (``GET /datastore/image``) is one 3D NIfTI file that 3D Slicer
opens as a scalar volume: the FLAIR of a per-modality case (the sequence annotators draw on; the
other modalities stay on the server and are read by the inference and training tasks; a case
without FLAIR serves its T2), the 4D file itself for MSD images (Slicer shows it as a 4-frame volume
sequence / its first channel).

Cases with missing sequences: a per-modality case may lack some of T1, T1ce, T2, FLAIR as long as it
has FLAIR or T2 (``custom.data``); it is listed like any case, ``model_input`` gives the files it
has and ``model_sequences`` their names (the bundle's loader zero-fills the others). The image info
(``GET /datastore/image/info``) shows ``sequences``.

Both check every label a client saves (``PUT /datastore/label``) before it is stored: a NIfTI
file, 3D ``(H, W, D)`` (a trailing singleton dimension is accepted), in the image's grid (same
shape, affine within 1e-3 mm) and with integer values of the dataset's label convention; a label
that fails gets HTTP 422 (415 if not NIfTI), naming what is wrong. The header is checked before the
voxels are read, so a huge upload with a wrong shape is refused without loading it. Labels and the
``datastore_v2.json`` metadata are written to a temporary file in the destination folder and
renamed over the destination (atomic on POSIX): a server killed mid-save leaves the old label or
the new one, never half a file. Image and label ids and tags are restricted to file-name-safe
characters (no ``/``, ``..``, NUL), so no request reaches outside the datastore.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag

from custom.atomic_files import TEMP_NAME, atomic_copy, atomic_write
from custom.data import (
    MODALITIES,
    BraTSCase,
    BraTSDataError,
    LabelConvention,
    Layout,
    NotNiftiError,
    check_image_voxels,
    check_label_values,
    detect_layout,
    list_cases,
    load_nifti,
    load_voxels,
)
from lib.security import track_request_file

logger = logging.getLogger(__name__)

SAFE_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # \Z: "$" would also match before a final newline
LABEL_SUFFIXES = (".nii.gz", ".nii")


def check_id(value: Any, what: str = "image id") -> str:
    """``value`` if it is a safe id (letters, digits, ``._-``, at most 128 characters, no ``..``); else HTTP 400."""
    if not isinstance(value, str) or not SAFE_ID.match(value) or ".." in value:
        shown = repr(value)[:80]
        raise HTTPException(
            status_code=400,
            detail=f"invalid {what} {shown}: use 1-128 letters, digits, '.', '_' or '-' (no path separators, no '..')",
        )
    return value


def remove_stale_temp_files(studies: str) -> list[str]:
    """Remove the temporary files of ``custom.atomic_files`` writes left in ``studies``
    (and ``labels/<tag>/``) by a process killed between writing and renaming; returns their paths.

    They are never counted as images or labels (hidden names, ``custom.atomic_files.TEMP_NAME``); this only keeps the
    folder clean. Done under the datastore's file lock, which every writer holds while its temporary
    file exists, so no write in progress is touched."""
    removed: list[str] = []
    labels = os.path.join(studies, "labels")
    with FileLock(os.path.join(studies, ".lock")):
        folders = [studies] + ([os.path.join(labels, t) for t in os.listdir(labels) if os.path.isdir(os.path.join(labels, t))] if os.path.isdir(labels) else [])
        for folder in folders:
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if TEMP_NAME.match(name) and os.path.isfile(path):
                    os.remove(path)
                    removed.append(path)
    if removed:
        logger.warning(f"Removed {len(removed)} temporary file(s) of an interrupted write: {removed[:5]}")
    return removed


def label_suffix(filename: str) -> str:
    """``.nii.gz`` or ``.nii`` of an uploaded label's name; HTTP 415 for anything else."""
    for suffix in LABEL_SUFFIXES:
        if filename.endswith(suffix):
            return suffix
    raise HTTPException(status_code=415, detail=f"labels must be NIfTI files (.nii.gz or .nii), got {os.path.basename(filename)!r}")


def remap_segments(data: np.ndarray, segments: list, convention: LabelConvention, where: str) -> np.ndarray:
    """Map 3D Slicer's exported segment indices to ``convention``'s values by segment name.

    Slicer's MONAI Label module writes segment *positions* (1..N) and sends ``label_info`` =
    ``[{"name": ..., "idx": ...}, ...]``; names must be the model's label names and each ``idx`` an
    integer >= 1 used once (0 is background: mapping it would turn the background into tumour);
    HTTP 422 otherwise."""
    values = {name: value for value, name in convention.names.items()}
    out = np.zeros(data.shape, np.uint8)
    seen = set()
    for seg in segments:
        name, idx = (seg.get("name"), seg.get("idx")) if isinstance(seg, dict) else (None, None)
        if name not in values or not isinstance(idx, int) or isinstance(idx, bool) or idx < 1 or idx in seen:
            raise HTTPException(
                status_code=422,
                detail=f"{where}: label_info entry {seg!r} does not name one of the labels {sorted(values)} with its own integer 'idx' "
                f">= 1 (0 is background; rename the segment to a label name)",
            )
        seen.add(idx)
        out[data == idx] = values[name]
    unmapped = sorted(set(np.unique(data).tolist()) - seen - {0})
    if unmapped:
        raise HTTPException(status_code=422, detail=f"{where}: label values {unmapped[:10]} have no entry in label_info {segments!r}")
    return out


def check_label_file(path: str, shape: tuple, affine: np.ndarray, convention: LabelConvention, where: str, segments: list | None = None) -> np.ndarray | None:
    """Refuse (HTTP 422/415) a label file that is not a NIfTI label map of ``convention`` in the grid ``shape``/``affine``.

    With ``segments`` (Slicer's ``label_info``) the values are first mapped by segment name; the
    mapped ``(H, W, D)`` uint8 map is returned (None without ``segments``: the file is stored as is)."""
    img = _load_upload(path, where)  # header checks (size, dtype, affine, truncation) before any voxel is read
    lshape = tuple(int(s) for s in img.shape)
    if len(lshape) == 4 and lshape[3] == 1:
        lshape = lshape[:3]
    if len(lshape) != 3:
        raise HTTPException(status_code=422, detail=f"{where}: a label must be a 3D (H, W, D) map, got shape {lshape}")
    if lshape != tuple(shape):
        raise HTTPException(status_code=422, detail=f"{where}: label shape {lshape} does not match the image's {tuple(shape)}")
    if not np.allclose(img.affine, affine, atol=1e-3):
        raise HTTPException(
            status_code=422,
            detail=f"{where}: label affine does not match the image's (different voxel size, orientation or origin):\n"
            f"{np.array2string(img.affine, precision=3)}\nvs image\n{np.array2string(affine, precision=3)}",
        )
    try:
        data = load_voxels(img, path, name=where)
    except BraTSDataError as e:  # truncated / corrupt voxel data
        raise HTTPException(status_code=422, detail=f"cannot read the label voxels: {e}") from e
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise HTTPException(status_code=422, detail=f"{where}: label values must be integers (found non-integer or NaN values)")
    if segments:
        data = remap_segments(data.reshape(lshape), segments, convention, where)
    try:
        check_label_values(data, convention, where)
    except BraTSDataError as e:
        raise HTTPException(status_code=422, detail=str(e)) from e
    return data if segments else None


def _load_upload(path: str, where: str) -> nib.Nifti1Image:
    """The header of an uploaded NIfTI file, checked by ``custom.data.load_nifti`` (messages say ``where``,
    not the server's temporary path): HTTP 415 if not a readable NIfTI file, 422 for a bad header."""
    try:
        return load_nifti(path, name=where)
    except NotNiftiError as e:
        raise HTTPException(status_code=415, detail=str(e)) from e
    except BraTSDataError as e:
        raise HTTPException(status_code=422, detail=str(e)) from e


class CheckedLocalDatastore(LocalDatastore):
    """MONAI Label's ``LocalDatastore`` (flat folder of 4D NIfTI images) with checked, atomic label saves.

    Images already in the folder are never deleted or overwritten through the API (HTTP 403/409).
    """

    def __init__(self, studies: str, convention: LabelConvention, **kwargs):
        self.convention = convention
        super().__init__(studies, **kwargs)

    # -- what the inference / training tasks read -------------------------------------------------
    def model_input(self, image_id: str) -> str | list[str]:
        """The network input of ``image_id``: a 4D NIfTI path (or 3D paths, see BraTSDatastore)."""
        return self.get_image_uri(self.require_image(image_id))

    def model_sequences(self, image_id: str) -> list[str]:
        """Names of the sequences in ``model_input`` (canonical order): a 4D image has all four."""
        self.require_image(image_id)
        return list(MODALITIES)

    def require_image(self, image_id: Any) -> str:
        """``image_id`` if valid and known; HTTP 400 / 404 otherwise."""
        check_id(image_id)
        if image_id not in self._datastore.objects:
            raise HTTPException(status_code=404, detail=f"unknown image id {image_id!r} (GET /datastore/?output=all lists the images)")
        return image_id

    def image_grid(self, image_id: str) -> tuple[tuple, np.ndarray]:
        """Spatial shape ``(H, W, D)`` and affine of the image the labels of ``image_id`` must match."""
        img = nib.load(self.get_image_uri(image_id))
        return tuple(int(s) for s in img.shape[:3]), img.affine

    # -- writes ------------------------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        self.require_image(image_id)
        check_id(label_tag, "label tag")
        suffix = label_suffix(label_filename)
        shape, affine = self.image_grid(image_id)
        segments = (label_info or {}).get("label_info")  # sent by 3D Slicer's MONAI Label module
        remapped = check_label_file(label_filename, shape, affine, self.convention, f"label for image {image_id!r}", segments)
        if remapped is None:
            self._store_label(image_id, label_filename, label_tag, label_info, suffix)
            return image_id
        mapped = label_filename[: -len(suffix)] + ".mapped" + suffix
        try:
            nib.save(nib.Nifti1Image(remapped, affine), mapped)
            self._store_label(image_id, mapped, label_tag, label_info, suffix)
        finally:
            if os.path.exists(mapped):
                os.remove(mapped)
        return image_id

    def _store_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any], suffix: str) -> None:
        """Copy a checked label into ``labels/<tag>/<id><suffix>`` atomically and record it."""
        label_path = self._datastore.label_path(label_tag)
        name = image_id + suffix
        with FileLock(self._lock_file):
            self._reload_locked()
            atomic_copy(label_filename, os.path.join(label_path, name))
            info = dict(label_info or {})
            info.update(ts=int(time.time()), name=name)
            self._datastore.objects[image_id].labels[label_tag] = DataModel(info=info, ext=suffix)
            self._update_datastore_file(lock=False)
            # one file per (image, tag): drop a previous one with the other suffix only once the record names the new
            # file (a kill before this leaves the old file beside it, which a restart ignores in favour of the record)
            for other in LABEL_SUFFIXES:
                stale = os.path.join(label_path, image_id + other)
                if other != suffix and os.path.exists(stale):
                    os.remove(stale)
        logger.info(f"Saved label {label_tag!r} of {image_id!r} -> {os.path.join(label_path, name)}")

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        suffix = label_suffix(image_filename)
        image_id = check_id(image_id or os.path.basename(image_filename)[: -len(suffix)])
        if image_id in self._datastore.objects:
            raise HTTPException(status_code=409, detail=f"image {image_id!r} already exists; images are never overwritten")
        where = f"image {image_id!r}"
        img = _load_upload(image_filename, where)  # header checks before any voxel is read
        if len(img.shape) != 4 or img.shape[3] != 4:
            raise HTTPException(status_code=422, detail=f"{where}: expected a 4D (H, W, D, 4) NIfTI, got shape {img.shape}")
        try:
            data = load_voxels(img, image_filename, name=where)
            for c in range(4):  # NaN/Inf, blank or overflow-prone channels would poison inference and training
                check_image_voxels(data[..., c], f"{where} (channel {c})")
        except BraTSDataError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        return self._add_image_atomically(image_id, image_filename, image_info)

    def _add_image_atomically(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        """``LocalDatastore.add_image`` with the copy written to a temporary file and renamed: a server
        killed mid-copy leaves no half-written image for the next start to register."""
        ext = label_suffix(image_filename)
        with FileLock(self._lock_file):
            self._reload_locked()
            if image_id in self._datastore.objects:
                raise HTTPException(status_code=409, detail=f"image {image_id!r} already exists; images are never overwritten")
            atomic_copy(image_filename, os.path.join(self._datastore.image_path(), image_id + ext))
            info = dict(image_info or {})
            info.update(ts=int(time.time()), name=image_id + ext)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        return image_id

    def remove_image(self, image_id: str) -> None:
        raise HTTPException(status_code=403, detail="images are part of the studies folder and are not deleted through the API")

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self.require_image(label_id)
        check_id(label_tag, "label tag")
        super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        self.require_image(image_id)
        with FileLock(self._lock_file):
            self._reload_locked()  # another process (scoring, training) may have written it
            self._datastore.objects[image_id].image.info.update(info)
            self._update_datastore_file(lock=False)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        with FileLock(self._lock_file):
            self._reload_locked()
            label = self._datastore.label(self.require_image(label_id), check_id(label_tag, "label tag"))
            if label is None:
                raise HTTPException(status_code=404, detail=f"image {label_id!r} has no {label_tag!r} label")
            label.info.update(info)
            self._update_datastore_file(lock=False)

    # Reads see what other processes wrote (MONAI Label runs training and scoring in subprocesses).
    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        self._init_from_datastore_file()
        return super().get_image_info(self.require_image(image_id))

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        self._init_from_datastore_file()
        label = self._datastore.label(self.require_image(label_id), check_id(label_tag, "label tag"))
        if label is None:
            raise HTTPException(status_code=404, detail=f"image {label_id!r} has no {label_tag!r} label")
        return label.info

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        self._init_from_datastore_file()
        return super().get_labeled_images(label_tag, labels)

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        self._init_from_datastore_file()
        return super().get_unlabeled_images(label_tag, labels)

    def json(self):
        self._init_from_datastore_file()
        return super().json()

    def _reload_locked(self):
        """Re-read ``datastore_v2.json`` if another process changed it (caller holds the file lock:
        ``_init_from_datastore_file`` would take it again with a second FileLock and deadlock)."""
        if os.path.exists(self._datastore_config_path):
            ts = os.stat(self._datastore_config_path).st_mtime
            if ts != self._config_ts:
                with open(self._datastore_config_path) as f:
                    self._datastore = LocalDatastoreModel.model_validate_json(f.read())
                self._datastore.base_path = self._datastore_path
                self._config_ts = ts

    def _update_datastore_file(self, lock=True):
        def write():
            self._ignore_event_config = True
            atomic_write(self._datastore_config_path, json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()


class BraTSDatastore(CheckedLocalDatastore):
    """A BraTS / MSD dataset folder as a read-only MONAI Label datastore; labels saved beside it in ``labels/``."""

    def __init__(self, studies: str, layout: Layout, **kwargs):
        self.layout = layout
        self._cases: dict[str, BraTSCase] = {}
        self._skipped: set[str] = set()
        super().__init__(studies, convention=layout.convention, extensions=("*.nii.gz", "*.nii"), **kwargs)
        if not self._cases:  # LocalDatastore skips reconciling in read-only mode; the case list is needed
            self._reconcile_datastore()

    def case(self, image_id: str) -> BraTSCase:
        self.require_image(image_id)
        return self._cases[image_id]

    def model_input(self, image_id: str) -> str | list[str]:
        """The case's files: one 4D file (MSD) or one 3D file a sequence present, canonical order."""
        return self.case(image_id).to_dict()["image"]

    def model_sequences(self, image_id: str) -> list[str]:
        return list(self.case(image_id).sequences)

    def get_image_uri(self, image_id: str) -> str:
        c = self._cases.get(image_id)
        if c is None:
            return ""
        return c.display_image  # the FLAIR (else the T2) of a per-modality case, the 4D file of an MSD case

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        info = super().get_image_info(image_id)
        if image_id in self._cases:
            info["path"] = self.get_image_uri(image_id)
            info["modalities"] = list(self._cases[image_id].images)
            info["sequences"] = list(self._cases[image_id].sequences)
        return info

    def image_grid(self, image_id: str) -> tuple[tuple, np.ndarray]:
        img = nib.load(self.get_image_uri(image_id))
        return tuple(int(s) for s in img.shape[:3]), img.affine

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        label = self._datastore.label(label_id, label_tag)
        if label is None:
            return ""
        if label.info.get("original"):
            return self._cases[label_id].label or ""
        return str(os.path.realpath(os.path.join(self._datastore.label_path(label_tag), label_id + label.ext)))

    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        return [
            {"image": self.model_input(i), "label": self.get_label_uri(i, DefaultLabelTag.FINAL), "sequences": self.model_sequences(i)}
            for i, obj in sorted(self._datastore.objects.items())
            if obj.labels.get(DefaultLabelTag.FINAL)
        ]

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        raise HTTPException(status_code=405, detail=f"{self.layout.name} dataset: add case folders on disk, not through the API")

    def remove_label(self, label_id: str, label_tag: str) -> None:
        label = self._datastore.label(self.require_image(label_id), check_id(label_tag, "label tag"))
        if label is not None and label.info.get("original"):
            raise HTTPException(status_code=403, detail=f"the {label_tag} label of {label_id!r} is the dataset's own segmentation file; it is not deleted")
        super().remove_label(label_id, label_tag)

    def get_dataset_archive(self, limit_cases: Optional[int]) -> str:
        items = self.datalist()[: limit_cases or None]
        if not items:
            raise HTTPException(status_code=404, detail="no labelled case to archive")
        with tempfile.NamedTemporaryFile(suffix=".zip", delete=False) as f:
            track_request_file(f.name)  # removed once the download is sent
            with zipfile.ZipFile(f, mode="w") as archive:
                for item in items:
                    case_id = Path(item["label"]).name.split(".")[0]
                    for path in ([item["image"]] if isinstance(item["image"], str) else item["image"]) + [item["label"]]:
                        archive.write(path, arcname=os.path.join(case_id, os.path.basename(path)))
            return f.name

    def _reconcile_datastore(self):
        """Rebuild the image list from the dataset's cases and the label list from ``labels/<tag>/`` + segmentation files."""
        self._init_from_datastore_file()
        try:
            listed = list_cases(self._datastore_path, check="none")
        except BraTSDataError as e:
            logger.error(f"datastore not refreshed: {e}")
            if self._cases:
                return
            raise
        cases = {}
        for c in listed:  # served ids only: a case the API could never name is not listed (nor trained on)
            if SAFE_ID.match(c.case_id) and ".." not in c.case_id:
                cases[c.case_id] = c
            elif c.case_id not in self._skipped:
                self._skipped.add(c.case_id)
                logger.warning(f"case {c.case_id!r} skipped: a case id must be 1-128 letters, digits, '.', '_' or '-' "
                               f"(rename its folder/files to serve it)")
        self._cases = cases
        objects = self._datastore.objects
        labels_dir = self._datastore.label_path(None)
        tags = sorted(t for t in os.listdir(labels_dir) if os.path.isdir(os.path.join(labels_dir, t)) and SAFE_ID.match(t))
        changed = False
        for image_id in [i for i in objects if i not in cases]:
            del objects[image_id]
            changed = True
        for image_id, case in cases.items():
            obj = objects.get(image_id)
            if obj is None:
                obj = objects[image_id] = ImageLabelModel(image=DataModel(ext="", info={"ts": int(time.time()), "name": image_id}))
                changed = True
            labels: dict[str, DataModel] = {}
            for tag in tags:
                found = [sfx for sfx in LABEL_SUFFIXES if os.path.isfile(os.path.join(labels_dir, tag, image_id + sfx))]
                if not found:
                    continue
                old = obj.labels.get(tag)
                if old is not None and old.ext in found and not old.info.get("original"):
                    labels[tag] = old  # the recorded file (a save killed before dropping the other suffix leaves both)
                else:
                    labels[tag] = DataModel(ext=found[0], info={"ts": int(time.time()), "name": image_id + found[0]})
            if DefaultLabelTag.FINAL not in labels and case.label is not None:
                old = obj.labels.get(DefaultLabelTag.FINAL)
                keep = old is not None and old.info.get("original")
                labels[DefaultLabelTag.FINAL] = old if keep else DataModel(ext="", info={"original": True, "name": os.path.basename(case.label)})
            if labels != obj.labels:
                obj.labels = labels
                changed = True
        if changed:
            self._update_datastore_file()


def open_datastore(studies: str, **kwargs) -> tuple[CheckedLocalDatastore, Layout]:
    """The datastore for ``studies`` and the layout its images follow (``msd`` channel order for a flat 4D folder)."""
    from custom.data import LAYOUTS

    try:
        layout = detect_layout(studies)
    except BraTSDataError:
        layout = None
    if not kwargs.get("read_only") and os.path.isdir(studies):
        remove_stale_temp_files(studies)
    if layout is None:
        return CheckedLocalDatastore(studies, convention=LAYOUTS["msd"].convention, **kwargs), LAYOUTS["msd"]
    return BraTSDatastore(studies, layout, **kwargs), layout
