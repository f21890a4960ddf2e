"""Cases of a dataset folder: detect its release layout, list and validate its cases.

Missing sequences: a per-modality case may lack some of the four files as long as it has FLAIR or
T2 (``REQUIRED_ANY``; the model is trained with random sequence dropout). ``BraTSCase.sequences``
names the sequences present (canonical order) and ``images`` holds only their files; the bundle's
loader (``custom.transforms.CheckedLoadImaged``) fills each missing channel with zeros. A case with
neither FLAIR nor T2 is refused naming what it has. MSD 4D images are always complete. Cases
without a label (validation/test releases) are listed with ``label=None``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.data.errors import BraTSDataError
from custom.data.nifti import check_image_voxels, load_nifti, load_voxels
from custom.data.vocabulary import (
    LAYOUTS,
    MODALITIES,
    SEQUENCE_ALIASES,
    REQUIRED_ANY,
    LabelConvention,
    Layout,
    describe_sequences,
    strip_nifti_suffix,
)


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
        hits = [c for n, c in by_name.items() if SEQUENCE_ALIASES.get(n) == m]
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
        check_same_grid(cid, ref_path, ref, path, img)
    label_img = None
    if case.label is not None:
        label_img = load_nifti(case.label, cid)
        if len(label_img.shape) == 4 and label_img.shape[3] == 1:
            pass  # a trailing singleton dimension is harmless
        elif len(label_img.shape) != 3:
            raise BraTSDataError(f"case {cid}: {case.label}: a label must be 3D, got shape {label_img.shape}")
        check_same_grid(cid, ref_path, ref, case.label, label_img)
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


def check_same_grid(cid: str, ref_path: str, ref: nib.Nifti1Image, path: str, img: nib.Nifti1Image) -> None:
    """Raise ``BraTSDataError`` unless ``img`` (at ``path``) has the shape and affine of ``ref``."""
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


def load_case(path: str | os.PathLike, case_id: str | None = None) -> tuple[BraTSCase, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The case at ``path`` and its four volumes ``{modality: (array (H, W, D), RAS affine)}``.

    ``path``: a BraTS 2021 / 2023 case folder, a 4D MSD image (channel order from the
    ``dataset.json`` two folders up, else MSD's FLAIR, T1w, t1gd, T2w), or a dataset folder of any
    layout with ``case_id`` naming the case. Raises ``BraTSDataError`` naming what is wrong.
    """
    case = find_case(path, case_id)
    validate_case(case)
    volumes = {}
    if len(case.images) == 1:  # MSD: one 4D file, reordered to the canonical order
        img = load_nifti(case.images[0], case.case_id)
        data = load_voxels(img, case.images[0], case.case_id)
        for m, c in zip(MODALITIES, case.layout.channel_index):
            volumes[m] = (np.asarray(data[..., c]), img.affine)
    else:
        for m, p in zip(case.sequences, case.images):  # a case may lack some sequences (custom.data.REQUIRED_ANY)
            img = load_nifti(p, case.case_id)
            volumes[m] = (np.asarray(load_voxels(img, p, case.case_id)), img.affine)
    return case, volumes


def find_case(path: str | os.PathLike, case_id: str | None = None) -> BraTSCase:
    """The case at ``path``: a BraTS 2021 / 2023 case folder, a 4D MSD image (its label from
    ``../labelsTr`` when there), or a dataset folder of any layout with ``case_id`` naming the case."""
    p = Path(path)
    if case_id is not None:
        cases = {c.case_id: c for c in list_cases(p, check="none")}
        if case_id not in cases:
            raise BraTSDataError(f"{p}: no case {case_id!r} (cases: {', '.join(sorted(cases)[:10])}{' ...' if len(cases) > 10 else ''})")
        return cases[case_id]
    if p.is_file():  # one 4D MSD image
        stem = strip_nifti_suffix(p.name)
        if stem is None:
            raise BraTSDataError(f"{p}: not a NIfTI file")
        root = p.parent.parent
        layout = detect_layout(root) if (root / "dataset.json").is_file() else LAYOUTS["msd"]
        label = root / "labelsTr" / p.name
        return BraTSCase(stem, (str(p),), str(label) if p.parent.name == "imagesTr" and label.is_file() else None, layout)
    if not p.is_dir():
        raise BraTSDataError(f"{p} does not exist")
    for layout in (LAYOUTS["brats2021"], LAYOUTS["brats2023"]):
        files = []
        for s in layout.suffixes[:4]:
            hits = [q for q in (p / f"{p.name}{layout.separator}{s}{ext}" for ext in (".nii.gz", ".nii")) if q.is_file()]
            files.append(hits[0] if hits else None)
        if all(files):
            seg = [q for q in (p / f"{p.name}{layout.separator}seg{ext}" for ext in (".nii.gz", ".nii")) if q.is_file()]
            return BraTSCase(p.name, tuple(str(f) for f in files), str(seg[0]) if seg else None, layout)
        if any(files):
            missing = [s for s, f in zip(layout.suffixes[:4], files) if f is None]
            raise BraTSDataError(f"case {p.name}: missing modality {', '.join(missing)} in {p}")
    raise BraTSDataError(
        f"{p}: not a BraTS case folder (expected {p.name}_{{t1,t1ce,t2,flair}}.nii.gz or {p.name}-{{t1n,t1c,t2w,t2f}}.nii.gz); "
        f"for a dataset folder pass --case ID"
    )
