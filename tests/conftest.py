"""Shared test helpers: tiny BraTS-layout datasets written as real NIfTI files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom.data import CONVENTIONS, LAYOUTS, MODALITIES, MSD_CHANNELS
from custom.synthetic import case_id, msd_dataset_json
from devtools import REPO  # noqa: F401  (the test modules import it from here)

PYTHON = sys.executable
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def toy_label(shape=(12, 10, 8), layout="brats2021") -> np.ndarray:
    """A nested toy tumour: ED box around an NCR box with an ET voxel layer."""
    conv = CONVENTIONS[layout]
    ncr, ed, et = conv.ncr, conv.ed, conv.et
    lab = np.zeros(shape, np.uint8)
    lab[2:10, 2:8, 2:6] = ed
    lab[4:8, 4:6, 3:5] = et
    lab[5:7, 4:6, 3:5] = ncr
    return lab


def toy_modalities(shape=(12, 10, 8), seed=0) -> list[np.ndarray]:
    """Four int16 volumes whose channel c has values 100*(c+1) + noise (identifies the channel)."""
    rng = np.random.default_rng(seed)
    return [(100 * (c + 1) + rng.integers(0, 10, shape)).astype(np.int16) for c in range(4)]


case_id_for = case_id  # the generator's case ids, by layout and index


def write_toy_dataset(root: Path, layout: str, n: int = 3, unlabelled: int = 0, shape=(12, 10, 8)) -> list[str]:
    """Write ``n`` toy cases in a real release layout; the last ``unlabelled`` have no label."""
    root.mkdir(parents=True, exist_ok=True)
    ids = []
    training, test = [], []
    for i in range(n):
        cid = case_id_for(layout, i)
        ids.append(cid)
        mods, lab = toy_modalities(shape, seed=i), toy_label(shape, layout)
        has_label = i < n - unlabelled
        if layout == "msd":
            sub = "imagesTr" if has_label else "imagesTs"
            (root / sub).mkdir(exist_ok=True)
            vol = np.stack([mods[MODALITIES.index(m)] for m in MSD_CHANNELS], axis=-1)
            nib.save(nib.Nifti1Image(vol, BRATS_AFFINE), root / sub / f"{cid}.nii.gz")
            if has_label:
                (root / "labelsTr").mkdir(exist_ok=True)
                nib.save(nib.Nifti1Image(lab, BRATS_AFFINE), root / "labelsTr" / f"{cid}.nii.gz")
                training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
            else:
                test.append(f"./imagesTs/{cid}.nii.gz")
            continue
        suffixes, sep = LAYOUTS[layout].suffixes, LAYOUTS[layout].separator
        case_dir = root / cid
        case_dir.mkdir(exist_ok=True)
        for m, s in zip(mods, suffixes[:4]):
            nib.save(nib.Nifti1Image(m, BRATS_AFFINE), case_dir / f"{cid}{sep}{s}.nii.gz")
        if has_label:
            nib.save(nib.Nifti1Image(lab, BRATS_AFFINE), case_dir / f"{cid}{sep}seg.nii.gz")
    if layout == "msd":
        meta = msd_dataset_json(training, test)
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return ids


@pytest.fixture(params=["brats2021", "brats2023", "msd"])
def layout(request) -> str:
    return request.param


def run_env() -> dict:
    """Environment for subprocesses: the venv's bin first on PATH, few threads."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "2")
    return env
