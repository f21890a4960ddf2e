"""A label map on the prepared (model) grid carried back onto the reference series' own grid."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from custom.data.nifti import load_nifti, load_voxels
from custom.preparation.errors import PreparationError


def load_report(report_or_dir: str | os.PathLike | dict) -> dict:
    """The preparation report: a dict, a report JSON file, or the output folder of ``prepare_study``."""
    if isinstance(report_or_dir, dict):
        return report_or_dir
    p = Path(report_or_dir)
    if p.is_dir():
        found = sorted(p.glob("*_preparation.json"))
        if len(found) != 1:
            raise PreparationError(f"{p}: expected one *_preparation.json report, found {len(found)}")
        p = found[0]
    return json.loads(p.read_text())


def map_to_reference(label_path: str | os.PathLike, report_or_dir, out_path: str | os.PathLike) -> Path:
    """Write ``label_path`` (a label map on the prepared grid) resampled by nearest neighbour onto the
    reference series' grid, as NIfTI (uint8, the reference's shape and affine). Returns ``out_path``."""
    report = load_report(report_or_dir)
    ref = report["reference"]
    img = load_nifti(label_path, name="label")
    label = np.asarray(load_voxels(img, os.fspath(label_path), name="label"))
    if label.ndim == 4 and label.shape[3] == 1:
        label = label[..., 0]
    grid_shape = tuple(report["grid"]["shape"])
    if label.shape != grid_shape:
        raise PreparationError(f"{label_path}: label of shape {label.shape}, the prepared grid is {grid_shape}")
    ref_shape, ref_affine = tuple(ref["shape"]), np.array(ref["affine_ras"], float)
    m = np.linalg.inv(np.asarray(img.affine, float)) @ ref_affine  # reference voxel -> label voxel
    out = ndi.affine_transform(np.rint(label).astype(np.uint8), m[:3, :3], m[:3, 3], ref_shape, order=0, cval=0)
    nii = nib.Nifti1Image(out, ref_affine)
    nii.set_qform(ref_affine, code=1)
    nii.set_sform(ref_affine, code=1)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nii, out_path)
    return out_path
