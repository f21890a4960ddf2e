"""The BraTS data layer: detect a dataset folder's release layout and list its cases.

Supported layouts (``Layout.name``):

- ``brats2021``: ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (BraTS 2018-2021 naming), labels
  1 NCR (necrotic tumour core), 2 ED (peritumoral oedema), 4 ET (enhancing tumour);
- ``brats2023``: ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (BraTS 2023+ GLI and the other
  sub-challenges with this naming), labels 1 NCR, 2 ED, 3 ET;
- ``msd``: Medical Segmentation Decathlon Task01_BrainTumour: ``dataset.json``, 4D
  ``imagesTr/*.nii.gz`` (H, W, D, 4) with channels FLAIR, T1w, t1gd, T2w, labels 1 oedema,
  2 non-enhancing tumour, 3 enhancing tumour; ``imagesTs`` holds the unlabelled cases.

Canonical channel order everywhere in this project (network input channel 0..3): ``MODALITIES`` =
T1, T1ce (T1 post-contrast, t1c/t1gd), T2, FLAIR (t2f). Per-modality layouts list the four files
in that order; for MSD the one 4D file is reordered with ``Layout.channel_index``.

Missing sequences: a per-modality case may lack some of the four files as long as it has FLAIR or
T2 (``REQUIRED_ANY``; the model is trained with random sequence dropout). ``BraTSCase.sequences``
names the sequences present (canonical order) and ``images`` holds only their files; the bundle's
loader (``custom.transforms.CheckedLoadImaged``) fills each missing channel with zeros. A case with
neither FLAIR nor T2 is refused naming what it has. MSD 4D images are always complete.

Output regions (network output channel 0..2): ``REGIONS`` = TC (tumour core: NCR + ET),
WT (whole tumour: NCR + ED + ET), ET (enhancing tumour).

Cases without a label (validation/test releases) are listed with ``label=None``.

Bad input: every file goes through :func:`load_nifti` (a readable NIfTI-1/2 file, gzip-compressed
exactly when named ``.nii.gz``) and :func:`check_header` (supported voxel type, at most
``MAX_IMAGE_BYTES`` of voxels and ``MAX_FOV_MM`` of field of view per axis, a finite non-degenerate
affine, a file long enough for what its header declares) before any voxel is read, so an absurd
header is refused without allocating memory. :func:`check_image_voxels` refuses NaN/infinite,
all-zero and overflow-prone (beyond ``MAX_ABS_INTENSITY``) images, :func:`check_label_values`
labels outside the release's convention. Every error is a :class:`BraTSDataError` naming the case
and the file (:class:`NotNiftiError` when the file is not a readable NIfTI file at all). Oblique and
anisotropic affines are accepted: the bundle resamples them (``Orientationd`` + ``Spacingd``).

When a program dies of an uncaught exception caused by a ``BraTSDataError`` (a bundle command whose
datalist or data loading failed: MONAI wraps our error in its own ``RuntimeError``), the message is
printed again as the last line of stderr, after the traceback (see :func:`install_excepthook`).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

MODALITIES = ("t1", "t1ce", "t2", "flair")
REQUIRED_ANY = ("flair", "t2")
"""A case must hold at least one of these sequences (the model accepts any subset of ``MODALITIES``
that contains one of them); the others may be missing."""
SEQUENCE_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
REGIONS = ("TC", "WT", "ET")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


MAX_IMAGE_BYTES = int(os.environ.get("BRATS_MAX_IMAGE_BYTES", 2**30))
"""Largest voxel array (header dimensions x voxel type size) a file may declare: 1 GiB by default
(a BraTS modality is 240 x 240 x 155 int16 = 18 MB, an MSD 4D float32 image 143 MB)."""
MAX_FOV_MM = float(os.environ.get("BRATS_MAX_FOV_MM", 500.0))
"""Largest field of view (voxels x voxel size) along any voxel axis: a head is about 250 mm; more
is another body part or a header with wrong voxel sizes/units (and would resample to a huge grid)."""
MAX_HEADER_BYTES = int(os.environ.get("BRATS_MAX_HEADER_BYTES", 2**24))
"""Largest header + extensions (the voxels' start, ``vox_offset``) and largest data after the voxels
that a file may hold: 16 MiB by default. More is a decompression bomb (a 0.4 MB ``.nii.gz`` can
expand to gigabytes of padding or extra gzip members), refused before it is expanded."""
MIN_VOXEL_MM = 0.01
"""Smallest voxel size accepted (10 micrometres); smaller ones are a degenerate affine."""
MAX_ABS_INTENSITY = 1e20
"""Largest image intensity magnitude: float32 statistics (MONAI's NormalizeIntensity mean) overflow
near 1e31 for a BraTS volume; MRI intensities are at most ~1e5."""
SUPPORTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64")


class BraTSDataError(ValueError):
    """A dataset folder, case or file that does not fit the BraTS conventions."""


class NotNiftiError(BraTSDataError):
    """A file that is not a readable NIfTI file at all (empty, not gzip, another format, cut header)."""


class OutputError(OSError):
    """An output folder or file that cannot be written (full disk, not a folder, no permission); the
    message names the path. Like ``BraTSDataError``, repeated as the last line of a failed command."""


@dataclass(frozen=True)
class LabelConvention:
    """Integer label values of one release's segmentation files.

    ``ncr`` is the necrotic core (MSD: the non-enhancing tumour), ``ed`` the oedema and ``et`` the
    enhancing tumour; 0 is background in every convention.
    """

    name: str
    ncr: int
    ed: int
    et: int
    names: dict[int, str] = field(compare=False)

    @property
    def values(self) -> tuple[int, ...]:
        return (0, self.ncr, self.ed, self.et)

    @property
    def region_labels(self) -> dict[str, tuple[int, ...]]:
        """Label values making up each region of ``REGIONS``."""
        return {"TC": (self.ncr, self.et), "WT": (self.ncr, self.ed, self.et), "ET": (self.et,)}


CONVENTIONS = {
    "brats2021": LabelConvention(
        "brats2021", ncr=1, ed=2, et=4, names={1: "necrotic tumour core", 2: "peritumoral oedema", 4: "enhancing tumour"}
    ),
    "brats2023": LabelConvention(
        "brats2023", ncr=1, ed=2, et=3, names={1: "necrotic tumour core", 2: "peritumoral oedema", 3: "enhancing tumour"}
    ),
    "msd": LabelConvention("msd", ncr=2, ed=1, et=3, names={1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}),
}


@dataclass(frozen=True)
class Layout:
    """A release layout: how its files are named, its label convention, its channel order."""

    name: str
    suffixes: tuple[str, ...]  # file-name suffixes of T1, T1ce, T2, FLAIR, seg (per-modality layouts)
    separator: str  # between case id and suffix
    channel_index: tuple[int, ...] = (0, 1, 2, 3)  # loaded channel order -> canonical order

    @property
    def convention(self) -> LabelConvention:
        return CONVENTIONS[self.name]


LAYOUTS = {
    "brats2021": Layout("brats2021", ("t1", "t1ce", "t2", "flair", "seg"), "_"),
    "brats2023": Layout("brats2023", ("t1n", "t1c", "t2w", "t2f", "seg"), "-"),
    # MSD's channel order (FLAIR, T1w, t1gd, T2w); the dataset.json of a folder may say otherwise.
    "msd": Layout("msd", (), "", channel_index=(1, 2, 3, 0)),
}
MSD_MODALITY_NAMES = {"t1": ("t1w", "t1", "t1n"), "t1ce": ("t1gd", "t1ce", "t1c"), "t2": ("t2w", "t2"), "flair": ("flair", "t2f")}


@dataclass(frozen=True)
class BraTSCase:
    """One case: its id, image file(s) in canonical channel order, and label file (or None).

    ``images`` holds one 3D file per available sequence (per-modality layouts) or one 4D file (MSD,
    reordered with ``layout.channel_index`` when loaded). ``sequences``: the names (``MODALITIES``)
    of the sequences present, canonical order; for a per-modality case ``images[i]`` is the file of
    ``sequences[i]``. All four for complete cases and MSD.
    """

    case_id: str
    images: tuple[str, ...]
    label: str | None
    layout: Layout
    sequences: tuple[str, ...] = MODALITIES

    @property
    def complete(self) -> bool:
        return tuple(self.sequences) == MODALITIES

    @property
    def display_image(self) -> str:
        """The file an annotator sees: the FLAIR, else the T2 (a per-modality case), or the 4D file."""
        if len(self.images) == 1 and self.complete:
            return self.images[0]
        for m in ("flair", "t2"):
            if m in self.sequences:
                return self.images[self.sequences.index(m)]
        return self.images[0]

    def to_dict(self) -> dict:
        """A MONAI datalist entry: ``image`` (a path or a list of the available sequences' paths in
        canonical order), ``sequences`` (their names), ``label`` when present."""
        one_4d = len(self.images) == 1 and self.complete
        item: dict = {"case_id": self.case_id, "image": self.images[0] if one_4d else list(self.images), "sequences": list(self.sequences)}
        if self.label is not None:
            item["label"] = self.label
        return item


def describe_sequences(sequences) -> str:
    """``('t1ce', 'flair')`` -> ``'T1ce, FLAIR'``."""
    return ", ".join(SEQUENCE_NAMES.get(m, m) for m in sequences)


def check_sequences(sequences, where: str) -> tuple[str, ...]:
    """The sequence names ``sequences`` in canonical order; ``BraTSDataError`` when a name is unknown,
    repeated, or when none of ``REQUIRED_ANY`` (FLAIR, T2) is present. ``where`` starts the message."""
    names = [str(m).strip().lower() for m in sequences]
    unknown = [m for m in names if m not in MODALITIES]
    if unknown or len(set(names)) != len(names):
        raise BraTSDataError(f"{where}: sequences must be distinct names among {', '.join(MODALITIES)}, got {list(sequences)!r}")
    present = tuple(m for m in MODALITIES if m in names)
    if not any(m in present for m in REQUIRED_ANY):
        has = describe_sequences(present) if present else "no image"
        raise BraTSDataError(f"{where}: has {has}; the model needs FLAIR or T2 (any of T1, T1ce, T2, FLAIR that includes one of them)")
    return present


def case_id_from_path(path: str | os.PathLike) -> str:
    """Case id of an image file: its folder's name for per-modality layouts (the folder is the
    case), else the file name without ``.nii.gz`` (MSD)."""
    p = Path(os.fspath(path))
    stem = strip_nifti_suffix(p.name) or p.stem
    return p.parent.name if p.parent.name and stem.startswith(p.parent.name) and stem != p.parent.name else stem


def strip_nifti_suffix(name: str) -> str | None:
    """File name without ``.nii.gz``/``.nii``, or None for a non-NIfTI name."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _per_modality_layout(case_dir: Path) -> Layout | None:
    """The per-modality layout whose modality file names (any of the four) occur in ``case_dir``, if any."""
    stems = {strip_nifti_suffix(p.name) for p in case_dir.iterdir() if p.is_file()} - {None}
    for layout in (LAYOUTS["brats2021"], LAYOUTS["brats2023"]):
        tail = tuple(layout.separator + s for s in layout.suffixes[:4])
        if any(stem.endswith(t) for stem in stems for t in tail):
            return layout
    return None


def detect_layout(dataset_dir: str | os.PathLike) -> Layout:
    """Detect the release layout of ``dataset_dir``; raises ``BraTSDataError`` if none fits."""
    try:
        return _detect_layout(Path(dataset_dir))
    except OSError as e:  # an unreadable folder
        raise BraTSDataError(f"{dataset_dir}: cannot list the dataset folder ({type(e).__name__}: {e})") from e


def _detect_layout(root: Path) -> Layout:
    if not root.is_dir():
        raise BraTSDataError(f"dataset folder {str(root)!r} does not exist or is not a folder")
    if (root / "dataset.json").is_file() and ((root / "imagesTr").is_dir() or (root / "imagesTs").is_dir()):
        return _msd_layout(root)
    found = {_per_modality_layout(d) for d in sorted(root.iterdir()) if d.is_dir()} - {None}
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        raise BraTSDataError(f"{root}: case folders of several layouts ({', '.join(sorted(x.name for x in found))}); keep one release per folder")
    entries = sorted(p.name for p in root.iterdir())[:10]
    raise BraTSDataError(
        f"{root}: no BraTS dataset found (expected case folders named like BraTS2021_00000/BraTS2021_00000_t1.nii.gz "
        f"or BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz, or an MSD Task01 folder with dataset.json and imagesTr/); "
        f"it holds: {entries if entries else 'nothing'}"
    )


def _read_msd_json(root: Path) -> dict:
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BraTSDataError(f"{root / 'dataset.json'}: unreadable MSD dataset.json ({e})") from e
    if not isinstance(meta, dict):
        raise BraTSDataError(f"{root / 'dataset.json'}: expected a JSON object, got {type(meta).__name__}")
    for key in ("training", "test"):
        if not isinstance(meta.get(key, []), list):
            raise BraTSDataError(f"{root / 'dataset.json'}: {key!r} must be a list, got {type(meta[key]).__name__}")
    return meta


def _msd_layout(root: Path) -> Layout:
    """The MSD layout, with the channel order taken from ``dataset.json``'s ``modality``."""
    modality = _read_msd_json(root).get("modality")
    if modality is None:
        return LAYOUTS["msd"]
    if not isinstance(modality, dict) or len(modality) != 4:
        raise BraTSDataError(f"{root / 'dataset.json'}: 'modality' must name 4 channels, got {modality!r}")
    try:
        by_name = {str(v).lower(): int(k) for k, v in modality.items()}
    except ValueError as e:
        raise BraTSDataError(f"{root / 'dataset.json'}: 'modality' keys must be channel numbers 0-3, got {list(modality)}") from e
    if sorted(by_name.values()) != [0, 1, 2, 3]:
        raise BraTSDataError(f"{root / 'dataset.json'}: 'modality' must name channels 0, 1, 2 and 3 once each, got {modality!r}")
    index = []
    for m in MODALITIES:
        hits = [by_name[n] for n in MSD_MODALITY_NAMES[m] if n in by_name]
        if len(hits) != 1:
            raise BraTSDataError(f"{root / 'dataset.json'}: cannot find modality {m!r} in 'modality' {modality!r}")
        index.append(hits[0])
    return Layout("msd", (), "", channel_index=tuple(index))


def _list_per_modality(root: Path, layout: Layout) -> list[BraTSCase]:
    cases = []
    for case_dir in sorted(d for d in root.iterdir() if d.is_dir()):
        files: dict[str, list[Path]] = {}
        for p in sorted(case_dir.iterdir()):
            stem = strip_nifti_suffix(p.name) if p.is_file() else None
            if stem is None:
                continue
            for suffix in layout.suffixes:
                if stem.endswith(layout.separator + suffix):
                    files.setdefault(suffix, []).append(p)
        if not files:
            continue  # not a case folder (e.g. a stray folder next to the cases)
        case_id = case_dir.name
        for suffix, paths in files.items():
            if len(paths) > 1:
                raise BraTSDataError(f"case {case_id}: duplicated {suffix!r} files: {', '.join(str(p) for p in paths)}")
        present = tuple(m for m, s in zip(MODALITIES, layout.suffixes) if s in files)
        missing = [s for s in layout.suffixes[:4] if s not in files]
        if not any(m in present for m in REQUIRED_ANY):
            expected = ", ".join(f"{case_id}{layout.separator}{s}.nii.gz" for m, s in zip(MODALITIES, layout.suffixes) if m in REQUIRED_ANY)
            has = describe_sequences(present) if present else "no image (only a segmentation)"
            raise BraTSDataError(
                f"case {case_id}: has {has}; the model needs FLAIR or T2 (missing modality {', '.join(missing)}; expected {expected} in {case_dir})"
            )
        label = files.get(layout.suffixes[4])
        images = tuple(str(files[s][0]) for m, s in zip(MODALITIES, layout.suffixes) if m in present)
        cases.append(BraTSCase(case_id, images, str(label[0]) if label else None, layout, present))
    return cases


def _list_msd(root: Path, layout: Layout) -> list[BraTSCase]:
    meta = _read_msd_json(root)

    def resolve(rel: str, what: str) -> Path:
        if not isinstance(rel, str) or not rel or "\0" in rel:
            raise BraTSDataError(f"{root / 'dataset.json'}: {what} must be a file path, got {rel!r}")
        path = (root / rel).resolve()
        if not path.is_file():
            raise BraTSDataError(f"{root / 'dataset.json'}: {what} {rel!r} does not exist ({path})")
        return path

    cases = []
    for entry in meta.get("training", []):
        if not isinstance(entry, dict) or "image" not in entry:
            raise BraTSDataError(f"{root / 'dataset.json'}: training entry {entry!r} has no 'image'")
        image = resolve(entry["image"], "image")
        label = resolve(entry["label"], "label") if entry.get("label") else None
        cases.append(BraTSCase(strip_nifti_suffix(image.name) or image.name, (str(image),), str(label) if label else None, layout))
    for entry in meta.get("test", []):
        image = resolve(entry["image"] if isinstance(entry, dict) else entry, "test image")
        cases.append(BraTSCase(strip_nifti_suffix(image.name) or image.name, (str(image),), None, layout))
    if not meta.get("training") and not meta.get("test"):  # a bare folder of 4D images
        for sub, labelled in (("imagesTr", True), ("imagesTs", False)):
            for image in sorted((root / sub).glob("*.nii*")) if (root / sub).is_dir() else []:
                if image.name.startswith("."):
                    continue  # MSD archives carry macOS '._' resource files
                label = root / "labelsTr" / image.name
                cases.append(BraTSCase(strip_nifti_suffix(image.name) or image.name, (str(image),), str(label) if labelled and label.is_file() else None, layout))
    return cases


def list_cases(dataset_dir: str | os.PathLike, check: str = "header") -> list[BraTSCase]:
    """List the cases of ``dataset_dir`` (any supported layout), sorted by case id.

    ``check``: ``"none"``; ``"header"`` (default) reads every file's NIfTI header and checks
    dimensions, shapes and affines agree; ``"full"`` also reads the voxels (truncated files,
    non-finite values, label values outside the convention). Errors name the case and the file.
    """
    if check not in ("none", "header", "full"):
        raise ValueError(f"check must be 'none', 'header' or 'full', got {check!r}")
    root = Path(dataset_dir)
    try:
        layout = detect_layout(root)
        cases = _list_msd(root, layout) if layout.name == "msd" else _list_per_modality(root, layout)
    except OSError as e:  # an unreadable folder
        raise BraTSDataError(f"{root}: cannot list the dataset ({type(e).__name__}: {e})") from e
    if not cases:
        raise BraTSDataError(f"{root}: {layout.name} layout detected but no case found")
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise BraTSDataError(f"{root}: duplicated case ids {duplicates}")
    if check != "none":
        for case in cases:
            validate_case(case, read_voxels=check == "full")
    return sorted(cases, key=lambda c: c.case_id)


def _who(case_id: str | None) -> str:
    return f"case {case_id}: " if case_id else ""


def _looks_like_nifti(head: bytes) -> bool:
    """The first bytes of an uncompressed NIfTI-1 or NIfTI-2 header (``sizeof_hdr`` 348 or 540)."""
    return len(head) >= 4 and head[:4] in {n.to_bytes(4, order) for n in (348, 540) for order in ("little", "big")}


def load_nifti(path: str | os.PathLike, case_id: str | None = None, name: str | None = None, check: bool = True) -> nib.Nifti1Image:
    """``nibabel.load`` with errors that name the case and the file; reads the header only.

    ``name`` replaces the path in messages (an uploaded file's temporary path means nothing to the
    client). With ``check`` (default) the header is checked with :func:`check_header`. Raises
    :class:`NotNiftiError` for a file that is not a readable NIfTI file, ``BraTSDataError`` for
    the rest.
    """
    p = os.fspath(path)
    where = f"{_who(case_id)}{name or p}"
    try:
        size = os.path.getsize(p)
        with open(p, "rb") as f:
            head = f.read(4)
    except FileNotFoundError as e:
        raise BraTSDataError(f"{where}: file not found") from e
    except OSError as e:
        raise BraTSDataError(f"{where}: cannot be read ({type(e).__name__}: {e.strerror or e})") from e
    if size == 0:
        raise NotNiftiError(f"{where}: not a readable NIfTI file (the file is empty)")
    gzipped = head[:2] == b"\x1f\x8b"
    if p.endswith(".gz") and not gzipped:
        hint = "it is an uncompressed NIfTI file: rename it to .nii" if _looks_like_nifti(head) else f"it starts with {head!r}"
        raise NotNiftiError(f"{where}: not a readable NIfTI file (named .gz but not gzip-compressed; {hint})")
    if p.endswith(".nii") and gzipped:
        raise NotNiftiError(f"{where}: not a readable NIfTI file (gzip-compressed but named .nii: rename it to .nii.gz)")
    _check_voxel_offset(p, gzipped, where)
    try:
        img = nib.load(p)
    except Exception as e:  # nibabel raises ImageFileError, HeaderDataError, OSError, EOFError, zlib/gzip errors...
        raise NotNiftiError(f"{where}: not a readable NIfTI file ({type(e).__name__}: {str(e).replace(p, name or p)})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NotNiftiError(f"{where}: not a readable NIfTI file (a {type(img).__name__})")
    if check:
        check_header(img, p, case_id, name)
    return img


def _check_voxel_offset(path: str, gzipped: bool, where: str) -> None:
    """Refuse a header whose voxels start beyond :data:`MAX_HEADER_BYTES` (``vox_offset``), or whose
    extensions nibabel would read to the end of the stream (extensions flagged, ``vox_offset`` inside
    the header). Reads the first 544 bytes only; anything that is not a NIfTI header is left to nibabel."""
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            head = f.read(544)
    except (EOFError, OSError, zlib.error):
        return  # nibabel names what is wrong
    for order in "<>":
        if len(head) >= 4 and int(np.frombuffer(head[:4], order + "i4")[0]) in (348, 540):
            break
    else:
        return
    nifti2 = int(np.frombuffer(head[:4], order + "i4")[0]) == 540
    hdr_size = 540 if nifti2 else 348
    if len(head) < hdr_size + 4:
        return
    offset = float(np.frombuffer(head[168:176], order + "i8")[0] if nifti2 else np.frombuffer(head[108:112], order + "f4")[0])
    if not math.isfinite(offset) or offset > MAX_HEADER_BYTES:
        raise BraTSDataError(
            f"{where}: the header puts the voxels at byte {offset:.0f} (vox_offset), beyond the "
            f"{MAX_HEADER_BYTES / 2**20:.3g} MiB allowed for header and extensions (BRATS_MAX_HEADER_BYTES); not read"
        )
    if head[hdr_size] != 0 and offset < hdr_size + 4:
        raise BraTSDataError(
            f"{where}: the header flags extensions but puts the voxels at byte {offset:.0f} (vox_offset), inside the "
            f"header: the extensions have no end; not read"
        )


def check_header(img: nib.Nifti1Image, path: str | os.PathLike, case_id: str | None = None, name: str | None = None) -> None:
    """Refuse (``BraTSDataError``) a header no voxel should be read for.

    Checks, without reading voxels: no empty dimension; a supported voxel type
    (:data:`SUPPORTED_DTYPES`: no complex, RGB or 128-bit types); at most :data:`MAX_IMAGE_BYTES`
    of voxels; a finite affine with voxel sizes >= :data:`MIN_VOXEL_MM`, non-collinear axes and a
    field of view <= :data:`MAX_FOV_MM` per axis; a file at least as long as the header says (for
    ``.nii.gz`` the gzip trailer's size field, then a streamed count if that disagrees).
    """
    p = os.fspath(path)
    where = f"{_who(case_id)}{name or p}"
    shape = tuple(int(s) for s in img.shape)
    if not shape or min(shape) < 1:
        raise BraTSDataError(f"{where}: the header declares an empty image (shape {shape})")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.newbyteorder("=").name not in SUPPORTED_DTYPES:
        raise BraTSDataError(f"{where}: voxel type {dtype} is not supported (expected one of {', '.join(SUPPORTED_DTYPES)})")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_IMAGE_BYTES:
        raise BraTSDataError(
            f"{where}: the header declares {shape} voxels of {dtype} = {nbytes / 2**30:.3g} GiB, more than the "
            f"{MAX_IMAGE_BYTES / 2**30:.3g} GiB limit (BRATS_MAX_IMAGE_BYTES); not read"
        )
    affine = np.asarray(img.affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise BraTSDataError(f"{where}: the voxel-to-world affine has NaN or infinite values:\n{np.array2string(affine, precision=3)}")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if zooms.min() < MIN_VOXEL_MM or abs(np.linalg.det(affine[:3, :3])) < 1e-3 * float(np.prod(zooms)):
        raise BraTSDataError(
            f"{where}: degenerate voxel-to-world affine (voxel sizes {np.array2string(zooms, precision=4)} mm; zero, "
            f"below {MIN_VOXEL_MM} mm or collinear axes):\n{np.array2string(affine, precision=4)}"
        )
    fov = np.asarray(shape[:3], float) * zooms[: len(shape[:3])]
    if fov.max() > MAX_FOV_MM:
        raise BraTSDataError(
            f"{where}: field of view {np.array2string(fov, precision=1)} mm exceeds {MAX_FOV_MM:g} mm (BRATS_MAX_FOV_MM): not a head "
            f"scan, or wrong voxel sizes/units in the header (voxel sizes {np.array2string(zooms, precision=4)} mm)"
        )
    _check_file_length(p, img, nbytes, where)


def _check_file_length(path: str, img: nib.Nifti1Image, nbytes: int, where: str) -> None:
    """``BraTSDataError`` when ``path`` holds fewer bytes than header + voxels (a truncated file)."""
    offset = getattr(img.dataobj, "offset", None)  # where nibabel reads the voxels (the loaded header's vox_offset is reset to 0)
    need = int(offset if offset is not None else img.header.get_data_offset()) + nbytes
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
        if not gzipped:
            have = os.fstat(f.fileno()).st_size
            if have < need:
                raise BraTSDataError(f"{where}: truncated or corrupt NIfTI data (the file has {have} bytes, its header declares {need})")
            return
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == need % 2**32:
            return  # the gzip trailer's uncompressed size (mod 2**32) is what the header declares
    # trailer disagrees: truncated, or several gzip members / trailing bytes; count what decompresses,
    # up to MAX_HEADER_BYTES past the voxels (a decompression bomb is not expanded further)
    have, most = 0, need + MAX_HEADER_BYTES + 1
    try:
        with gzip.open(path, "rb") as g:
            while have < most:
                chunk = g.read(min(1 << 22, most - have))
                if not chunk:
                    break
                have += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        if have >= need:
            return  # the voxels are all there; load_voxels names a corrupt tail when it reads them
        raise BraTSDataError(f"{where}: truncated or corrupt NIfTI data ({type(e).__name__}: {e}; {have} of {need} bytes readable)") from e
    if have < need:
        raise BraTSDataError(f"{where}: truncated or corrupt NIfTI data (it decompresses to {have} bytes, its header declares {need})")
    if have == most:
        raise BraTSDataError(_bomb_message(where))


def _bomb_message(where: str) -> str:
    return (f"{where}: the compressed stream holds more than {MAX_HEADER_BYTES / 2**20:.3g} MiB after the voxels its header "
            f"declares (padding or extra gzip members; BRATS_MAX_HEADER_BYTES); not read further")


def load_voxels(img: nib.Nifti1Image, path: str, case_id: str | None = None, name: str | None = None) -> np.ndarray:
    """The voxel array of ``img`` (loaded from ``path``); a truncated or corrupt file raises ``BraTSDataError``.

    A gzip-compressed file is decompressed to its end with its CRC checked (nibabel stops reading
    before the gzip trailer, so a flipped bit in the compressed stream would otherwise give wrong
    voxels silently), into one buffer of header + voxels: a stream holding more than
    :data:`MAX_HEADER_BYTES` after the voxels (padding, extra gzip members) is refused, not expanded.
    Peak memory: the declared header + voxels, plus the array when the header scales intensities."""
    p = os.fspath(path)
    where = f"{_who(case_id)}{name or p}"
    try:
        with open(p, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        if not gzipped:
            return np.asanyarray(img.dataobj)
        proxy = img.dataobj
        shape, dtype, offset = tuple(int(n) for n in proxy.shape), proxy.dtype, int(proxy.offset)
        buf = bytearray(offset + math.prod(shape) * dtype.itemsize)
        view, got = memoryview(buf), 0
        with gzip.open(p, "rb") as g:
            while got < len(buf):
                n = g.readinto(view[got:])
                if not n:
                    break
                got += n
            extra = len(g.read(MAX_HEADER_BYTES + 1)) if got == len(buf) else 0  # reads to the trailer: checks the CRC
    except Exception as e:  # EOFError, zlib.error, BadGzipFile (CRC), OSError, ValueError from a short read
        raise BraTSDataError(f"{where}: truncated or corrupt NIfTI data ({type(e).__name__}: {e})") from e
    if got < len(buf):
        raise BraTSDataError(f"{where}: truncated or corrupt NIfTI data (it decompresses to {got} bytes, its header declares {len(buf)})")
    if extra > MAX_HEADER_BYTES:
        raise BraTSDataError(_bomb_message(where))
    raw = np.frombuffer(buf, dtype, math.prod(shape), offset).reshape(shape, order="F")
    return nib.volumeutils.apply_read_scaling(raw, np.asanyarray(proxy.slope), np.asanyarray(proxy.inter))


def check_image_voxels(data, where: str) -> None:
    """Refuse (``BraTSDataError``) image voxels that are NaN/infinite, all zero or all one value, or beyond
    :data:`MAX_ABS_INTENSITY` (they overflow float32 statistics). ``data``: a numpy array or tensor.

    Two reductions (min and max, which NaN propagates through) and no temporary array: about 10 ms
    for a 240 x 240 x 155 float32 volume.
    """
    data = np.asarray(data.detach().cpu() if hasattr(data, "detach") else data)
    lo, hi = float(data.min()), float(data.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        n_nan = int(np.isnan(data).sum()) if data.dtype.kind == "f" else 0
        n_inf = int(np.isinf(data).sum()) if data.dtype.kind == "f" else 0
        raise BraTSDataError(f"{where}: contains NaN or infinite voxels ({n_nan} NaN, {n_inf} infinite)")
    if max(-lo, hi) > MAX_ABS_INTENSITY:
        raise BraTSDataError(f"{where}: intensities up to {max(-lo, hi):.3g} exceed {MAX_ABS_INTENSITY:g} (overflow-prone; MRI intensities are at most ~1e5)")
    if lo == hi:  # nothing to segment: blank, or one value everywhere
        what = "all voxels are 0 (an empty or blank image)" if lo == 0 else f"all voxels equal {lo:g} (a constant, featureless image)"
        raise BraTSDataError(f"{where}: {what}")


def validate_case(case: BraTSCase, read_voxels: bool = False) -> None:
    """Check a case's files agree with each other and with its layout; raise ``BraTSDataError``.

    Headers only (see :func:`check_header`) unless ``read_voxels``: then also every image's voxels
    (:func:`check_image_voxels`, per channel of a 4D file) and the label's values.
    """
    cid = case.case_id
    headers = {p: load_nifti(p, cid) for p in case.images}
    expected_ndim = 4 if len(case.images) == 1 and case.complete else 3
    for path, img in headers.items():
        if len(img.shape) != expected_ndim:
            raise BraTSDataError(f"case {cid}: {path}: expected a {expected_ndim}D image, got shape {img.shape}")
        if expected_ndim == 4 and img.shape[3] != len(MODALITIES):
            raise BraTSDataError(f"case {cid}: {path}: a 4D image must have {len(MODALITIES)} channels (FLAIR, T1w, t1gd, T2w), got {img.shape[3]}")
    ref_path, ref = next(iter(headers.items()))
    for path, img in list(headers.items())[1:]:
        _check_same_grid(cid, ref_path, ref, path, img)
    label_img = None
    if case.label is not None:
        label_img = load_nifti(case.label, cid)
        if len(label_img.shape) == 4 and label_img.shape[3] == 1:
            pass  # a trailing singleton dimension is harmless
        elif len(label_img.shape) != 3:
            raise BraTSDataError(f"case {cid}: {case.label}: a label must be 3D, got shape {label_img.shape}")
        _check_same_grid(cid, ref_path, ref, case.label, label_img)
    if not read_voxels:
        return
    for path, img in headers.items():
        data = load_voxels(img, path, cid)
        if data.ndim == 4:  # MSD: name the channel (file order) and its modality
            names = {file_c: MODALITIES[k] for k, file_c in enumerate(case.layout.channel_index)}
            for c in range(data.shape[3]):
                check_image_voxels(data[..., c], f"case {cid}: {path} (channel {c}, {names.get(c, '?')})")
        else:
            check_image_voxels(data, f"case {cid}: {path}")
    if label_img is not None:
        check_label_values(load_voxels(label_img, case.label, cid), case.layout.convention, f"case {cid}: {case.label}")


def _check_same_grid(cid: str, ref_path: str, ref: nib.Nifti1Image, path: str, img: nib.Nifti1Image) -> None:
    if tuple(img.shape[:3]) != tuple(ref.shape[:3]):
        raise BraTSDataError(f"case {cid}: {path} has shape {img.shape[:3]} but {ref_path} has {ref.shape[:3]}")
    if not np.allclose(img.affine, ref.affine, atol=1e-3):
        raise BraTSDataError(
            f"case {cid}: {path} and {ref_path} have different affines (world positions disagree):\n"
            f"{np.array2string(img.affine, precision=3)}\nvs\n{np.array2string(ref.affine, precision=3)}"
        )


def check_label_values(label: np.ndarray, convention: LabelConvention, where: str) -> None:
    """Raise ``BraTSDataError`` when ``label`` holds values outside ``convention`` (NaN, fractions,
    huge integers of any dtype included)."""
    arr = np.asarray(label)
    bad = ~np.isin(arr, convention.values)  # one pass; only the offending voxels are sorted
    if bad.any():
        unexpected = [int(v) if float(v).is_integer() else v for v in np.unique(arr[bad]).tolist()]
        raise BraTSDataError(
            f"{where}: label values {unexpected[:10]} are not in the {convention.name} convention "
            f"{list(convention.values)} ({', '.join(f'{k} {v}' for k, v in convention.names.items())})"
        )


def _clear_error(exc: BaseException) -> tuple[str, str] | None:
    """``(name, message)`` of the ``BraTSDataError`` or ``OutputError`` that caused ``exc`` (through
    ``__cause__``/``__context__``, or in the text of an exception re-raised from a DataLoader worker
    process), if any; ``name`` is ``"BraTSDataError"`` for a data error of any kind."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (BraTSDataError, OutputError)):
            return ("OutputError" if isinstance(e, OutputError) else "BraTSDataError"), str(e)
        match = re.search(r"(?:^|\n)(?:custom\.brats\.)?(BraTSDataError|NotNiftiError|OutputError): (.*?)(?:\n\n|\Z)", str(e), re.S)
        if match:
            return ("OutputError" if match.group(1) == "OutputError" else "BraTSDataError"), match.group(2).strip()
        e = e.__cause__ or e.__context__
    return None


def _data_error_message(exc: BaseException) -> str | None:
    """The message of the data or output error that caused ``exc`` (see :func:`_clear_error`), if any."""
    found = _clear_error(exc)
    return found[1] if found else None


def install_excepthook() -> None:
    """Make an uncaught exception caused by a ``BraTSDataError`` or ``OutputError`` end stderr with
    that error's message.

    MONAI wraps errors raised while parsing a bundle config or applying a transform in its own
    ``RuntimeError`` ("Failed to evaluate ...", "applying transform ..."), so the traceback's last
    line says nothing about the data; this prints ``BraTSDataError: <case and file: what is wrong>``
    after the usual traceback. Other exceptions are untouched. Installed once when this module is
    imported (every bundle config imports it); idempotent.
    """
    previous = sys.excepthook
    if getattr(previous, "_brats_hook", False):
        return

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        found = _clear_error(exc) if isinstance(exc, BaseException) else None
        if found and not isinstance(exc, (BraTSDataError, OutputError)):
            sys.stderr.write(f"\n{found[0]}: {found[1]}\n")
            sys.stderr.flush()

    hook._brats_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook


install_excepthook()


def main(argv: list[str] | None = None) -> int:
    """``python -m custom.brats DIR``: detect the layout, check every case fully, print a summary."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("dataset_dir")
    parser.add_argument("--check", default="full", choices=("none", "header", "full"))
    args = parser.parse_args(argv)
    try:
        cases = list_cases(args.dataset_dir, check=args.check)
    except BraTSDataError as e:
        parser.exit(2, f"error: {e}\n")
    layout = cases[0].layout
    labelled = sum(c.label is not None for c in cases)
    print(f"{args.dataset_dir}: layout {layout.name}, {len(cases)} cases ({labelled} labelled), labels {layout.convention.names}")
    for c in cases:
        if not c.complete:
            missing = [m for m in MODALITIES if m not in c.sequences]
            print(f"case {c.case_id}: sequences {describe_sequences(c.sequences)} (missing {describe_sequences(missing)}: zero-filled at inference)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
