"""Writing generated cases in the real release layouts (BraTS 2021, BraTS 2023 GLI, MSD Task01) and the CLI.

Files are byte-reproducible (gzip header with mtime 0 and no file name); case ``i`` depends only
on ``(seed, i)``, so a pool can be written by several processes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.atomic_files import atomic_write
from custom.data.vocabulary import CONVENTIONS, LAYOUTS, MODALITIES, MSD_CHANNELS
from custom.synthetic.generator import generate_case
from custom.synthetic.grid import SIZES, check_size
from custom.synthetic.tumour import ED, ET, NCR

LAYOUT_NAMES = tuple(LAYOUTS)
"""Layouts written: ``custom.data.LAYOUTS``' names (brats2021, brats2023, msd)."""


def _label_values(layout: str) -> dict[int, int]:
    """Generator label -> the value written in ``layout`` (its ``custom.data.CONVENTIONS`` entry)."""
    conv = CONVENTIONS[layout]
    return {NCR: conv.ncr, ED: conv.ed, ET: conv.et}


def case_id(layout: str, index: int) -> str:
    """Case identifier of case ``index`` (0-based): ``BraTS2021_00000``, ``BraTS-GLI-00000-000``, ``BRATS_001``."""
    if layout == "brats2021":
        return f"BraTS2021_{index:05d}"
    if layout == "brats2023":
        return f"BraTS-GLI-{index:05d}-000"
    if layout == "msd":
        return f"BRATS_{index + 1:03d}"
    raise ValueError(f"layout must be one of {LAYOUT_NAMES}, got {layout!r}")


def _case_files(layout: str, index: int, labelled: bool) -> dict[str, str]:
    """Relative paths of one case's files: keys modality names / "image" (msd) and "seg"."""
    cid = case_id(layout, index)
    if layout == "msd":
        files = {"image": f"{'imagesTr' if labelled else 'imagesTs'}/{cid}.nii.gz"}
        if labelled:
            files["seg"] = f"labelsTr/{cid}.nii.gz"
        return files
    lay = LAYOUTS[layout]
    names = dict(zip((*MODALITIES, "seg"), lay.suffixes))
    return {k: f"{cid}/{cid}{lay.separator}{v}.nii.gz" for k, v in names.items() if labelled or k != "seg"}


def planned_files(cases: int, layout: str, unlabelled: int = 0) -> list[str]:
    """All relative paths (files only) that :func:`write_dataset` writes for these arguments."""
    out = []
    for i in range(cases):
        out.extend(_case_files(layout, i, i < cases - unlabelled).values())
    if layout == "msd":
        out.append("dataset.json")
    return out


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Save a NIfTI-1 .nii.gz with qform = sform = ``affine`` (codes 1), mm units, gzip mtime 0."""
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(arr.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    # gzip.compress writes no file name; mtime=0 makes the bytes reproducible.
    atomic_write(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def _check_out_dir(out: Path, planned: list[str]) -> None:
    """Refuse to write into a directory that holds a different dataset.

    A different dataset is any NIfTI image or ``dataset.json`` under ``out`` that this run would
    not (re)write (another layout, more cases, a label that would now be missing). Other files
    (notes, PNG renders) are left alone. Nothing is ever deleted.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    wanted = set(planned)
    foreign = []
    for p in sorted(out.rglob("*")):
        if not p.is_file() or not (p.name.endswith((".nii", ".nii.gz")) or p.name == "dataset.json"):
            continue
        rel = p.relative_to(out).as_posix()
        if rel not in wanted:
            foreign.append(rel)
    if foreign:
        more = f" (and {len(foreign) - 5} more)" if len(foreign) > 5 else ""
        raise FileExistsError(
            f"{out} holds a different dataset: {', '.join(foreign[:5])}{more} would not be rewritten by this "
            f"run; choose an empty or new directory (nothing was deleted)")


def _msd_dataset_json(cases: int, unlabelled: int) -> dict:
    training, test = [], []
    for i in range(cases):
        files = _case_files("msd", i, i < cases - unlabelled)
        if "seg" in files:
            training.append({"image": f"./{files['image']}", "label": f"./{files['seg']}"})
        else:
            test.append(f"./{files['image']}")
    return msd_dataset_json(training, test)


def msd_dataset_json(training: list[dict], test: list[str]) -> dict:
    """An MSD Task01 ``dataset.json`` for these ``training`` entries and ``test`` image paths."""
    return {
        "name": "BRATS",
        "description": "Generated gliomas (oedema, non-enhancing/necrotic core, enhancing tumour) on the "
                       "MNI ICBM152 2009a anatomy, in the layout of MSD Task01_BrainTumour; generated by "
                       "custom.synthetic, not patient data",
        "reference": "Layout of the Medical Segmentation Decathlon Task01_BrainTumour (BraTS 2016/2017); "
                     "anatomy: MNI ICBM152 nonlinear 2009a (Fonov et al. 2011)",
        "licence": "CC-BY-SA 4.0",
        "release": "synthetic 2.0",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }


def encode_labels(seg: np.ndarray, layout: str) -> np.ndarray:
    """Convert an internal-encoding label map to ``layout``'s label values (uint8)."""
    lut = np.zeros(256, np.uint8)
    for k, v in _label_values(layout).items():
        lut[k] = v
    return lut[seg]


def _write_case(job) -> tuple[str, float, bool]:
    """Generate and write one case; returns its id, the seconds it took and whether it is labelled."""
    out, layout, i, seed, size, labelled = job
    t = time.perf_counter()
    files = _case_files(layout, i, labelled)
    images, seg, affine = generate_case(i, seed, size)
    for rel in files.values():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
    if layout == "msd":
        _save_nifti(np.stack([images[m] for m in MSD_CHANNELS], axis=-1), affine, out / files["image"])
    else:
        for m in MODALITIES:
            _save_nifti(images[m], affine, out / files[m])
    if labelled:
        _save_nifti(encode_labels(seg, layout), affine, out / files["seg"])
    return case_id(layout, i), time.perf_counter() - t, labelled


def write_dataset(out, cases: int, seed: int = 0, layout: str = "brats2021", size: str = "full",
                  unlabelled: int = 0, verbose: bool = False, workers: int = 1) -> list[str]:
    """Write ``cases`` synthetic cases (indices 0..cases-1) under ``out`` in ``layout``.

    The last ``unlabelled`` cases get no label file (brats2021/2023) or go to ``imagesTs`` (msd).
    Refuses (``FileExistsError``) an ``out`` holding NIfTI files or a ``dataset.json`` this call
    would not write (a different dataset); overwrites its own files; never deletes anything. ``workers``
    processes generate cases in parallel (same bytes). Returns the written case ids in order.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUT_NAMES}, got {layout!r}")
    check_size(size)
    cases, unlabelled, seed = int(cases), int(unlabelled), int(seed)
    if cases < 1:
        raise ValueError("cases must be >= 1")
    if not 0 <= unlabelled <= cases:
        raise ValueError("unlabelled must be between 0 and cases")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    out = Path(out)
    _check_out_dir(out, planned_files(cases, layout, unlabelled))
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, layout, i, seed, size, i < cases - unlabelled) for i in range(cases)]
    ids = []
    if workers > 1 and cases > 1:
        with ProcessPoolExecutor(workers) as pool:
            for cid, seconds, labelled in pool.map(_write_case, jobs):
                ids.append(cid)
                if verbose:
                    print(f"{cid}: {seconds:.1f} s{'' if labelled else ' (unlabelled)'}", flush=True)
    else:
        for job in jobs:
            cid, seconds, labelled = _write_case(job)
            ids.append(cid)
            if verbose:
                print(f"{cid}: {seconds:.1f} s{'' if labelled else ' (unlabelled)'}", flush=True)
    if layout == "msd":
        text = json.dumps(_msd_dataset_json(cases, unlabelled), indent=4) + "\n"
        atomic_write(out / "dataset.json", text.encode())
    return ids


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m custom.synthetic",
        description="Write generated glioma cases (MNI ICBM152 anatomy) in a real BraTS release layout.")
    p.add_argument("--out", required=True, type=Path,
                   help="output directory (new, empty, or the same dataset's: its files are overwritten)")
    p.add_argument("--cases", type=_int_at_least(1), default=4, help="number of cases (default 4)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="dataset seed (default 0)")
    p.add_argument("--layout", choices=LAYOUT_NAMES, default="brats2021",
                   help="brats2021: BraTS2021_XXXXX/..._{t1,t1ce,t2,flair,seg}; brats2023: BraTS-GLI-XXXXX-000/...-"
                        "{t1n,t1c,t2w,t2f,seg}; msd: Task01_BrainTumour (default brats2021)")
    p.add_argument("--size", choices=SIZES, default="full",
                   help="full: 240x240x155 at 1 mm; medium: 120x120x78 at 2 mm; small: 96x96x62 at 2.5 mm (default full)")
    p.add_argument("--workers", type=_int_at_least(1), default=1, help="processes generating cases (default 1)")
    p.add_argument("--unlabelled", type=_int_at_least(0), default=0,
                   help="write the last K cases without labels (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print per-case progress")
    args = p.parse_args(argv)
    if args.unlabelled > args.cases:
        p.error(f"--unlabelled ({args.unlabelled}) must not exceed --cases ({args.cases})")
    try:
        ids = write_dataset(args.out, args.cases, args.seed, args.layout, args.size, args.unlabelled,
                            verbose=not args.quiet, workers=args.workers)
    except FileExistsError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    if not args.quiet:
        print(f"wrote {len(ids)} {args.layout} cases ({args.size}) to {args.out}")
    return 0

