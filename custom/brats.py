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

Output regions (network output channel 0..2): ``REGIONS`` = TC (tumour core: NCR + ET),
WT (whole tumour: NCR + ED + ET), ET (enhancing tumour).

Cases without a label (validation/test releases) are listed with ``label=None``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

MODALITIES = ("t1", "t1ce", "t2", "flair")
REGIONS = ("TC", "WT", "ET")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class BraTSDataError(ValueError):
    """A dataset folder, case or file that does not fit the BraTS conventions."""


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

    ``images`` holds four 3D files (per-modality layouts) or one 4D file (MSD, reordered with
    ``layout.channel_index`` when loaded).
    """

    case_id: str
    images: tuple[str, ...]
    label: str | None
    layout: Layout

    def to_dict(self) -> dict:
        """A MONAI datalist entry: ``image`` (a path or a list of four), ``label`` when present."""
        item: dict = {"case_id": self.case_id, "image": list(self.images) if len(self.images) > 1 else self.images[0]}
        if self.label is not None:
            item["label"] = self.label
        return item


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
    """The per-modality layout whose T1ce/FLAIR names occur in ``case_dir``, if any."""
    stems = {strip_nifti_suffix(p.name) for p in case_dir.iterdir() if p.is_file()} - {None}
    for layout in (LAYOUTS["brats2021"], LAYOUTS["brats2023"]):
        tail = tuple(layout.separator + s for s in layout.suffixes[:4])
        if any(stem.endswith(t) for stem in stems for t in (tail[1], tail[3])):
            return layout
    return None


def detect_layout(dataset_dir: str | os.PathLike) -> Layout:
    """Detect the release layout of ``dataset_dir``; raises ``BraTSDataError`` if none fits."""
    root = Path(dataset_dir)
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
        return json.loads((root / "dataset.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BraTSDataError(f"{root / 'dataset.json'}: unreadable MSD dataset.json ({e})") from e


def _msd_layout(root: Path) -> Layout:
    """The MSD layout, with the channel order taken from ``dataset.json``'s ``modality``."""
    modality = _read_msd_json(root).get("modality")
    if modality is None:
        return LAYOUTS["msd"]
    if not isinstance(modality, dict) or len(modality) != 4:
        raise BraTSDataError(f"{root / 'dataset.json'}: 'modality' must name 4 channels, got {modality!r}")
    by_name = {str(v).lower(): int(k) for k, v in modality.items()}
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
        missing = [s for s in layout.suffixes[:4] if s not in files]
        if missing:
            expected = ", ".join(f"{case_id}{layout.separator}{s}.nii.gz" for s in missing)
            raise BraTSDataError(f"case {case_id}: missing modality {', '.join(missing)} (expected {expected} in {case_dir})")
        label = files.get(layout.suffixes[4])
        images = tuple(str(files[s][0]) for s in layout.suffixes[:4])
        cases.append(BraTSCase(case_id, images, str(label[0]) if label else None, layout))
    return cases


def _list_msd(root: Path, layout: Layout) -> list[BraTSCase]:
    meta = _read_msd_json(root)

    def resolve(rel: str, what: str) -> Path:
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
    layout = detect_layout(root)
    cases = _list_msd(root, layout) if layout.name == "msd" else _list_per_modality(root, layout)
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


def load_nifti(path: str | os.PathLike, case_id: str | None = None) -> nib.Nifti1Image:
    """``nibabel.load`` with errors that name the case and the file."""
    who = f"case {case_id}: " if case_id else ""
    try:
        img = nib.load(os.fspath(path))
    except FileNotFoundError as e:
        raise BraTSDataError(f"{who}{path}: file not found") from e
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, zlib/gzip errors...
        raise BraTSDataError(f"{who}{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BraTSDataError(f"{who}{path}: not a NIfTI image ({type(img).__name__})")
    return img


def load_voxels(img: nib.Nifti1Image, path: str, case_id: str | None = None) -> np.ndarray:
    """The voxel array of ``img``; a truncated or corrupt file raises ``BraTSDataError``."""
    who = f"case {case_id}: " if case_id else ""
    try:
        return np.asanyarray(img.dataobj)
    except Exception as e:  # EOFError, zlib.error, OSError, ValueError from a short read
        raise BraTSDataError(f"{who}{path}: truncated or corrupt NIfTI data ({type(e).__name__}: {e})") from e


def validate_case(case: BraTSCase, read_voxels: bool = False) -> None:
    """Check a case's files agree with each other and with its layout; raise ``BraTSDataError``."""
    cid = case.case_id
    headers = {p: load_nifti(p, cid) for p in case.images}
    expected_ndim = 4 if len(case.images) == 1 else 3
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
        if not np.all(np.isfinite(data)):
            raise BraTSDataError(f"case {cid}: {path}: contains NaN or infinite voxels")
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
    """Raise ``BraTSDataError`` when ``label`` holds values outside ``convention``."""
    values = np.unique(np.asarray(label))
    unexpected = [v for v in values.tolist() if v not in convention.values]
    if unexpected:
        unexpected = [int(v) if float(v).is_integer() else v for v in unexpected]
        raise BraTSDataError(
            f"{where}: label values {unexpected[:10]} are not in the {convention.name} convention "
            f"{list(convention.values)} ({', '.join(f'{k} {v}' for k, v in convention.names.items())})"
        )


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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
