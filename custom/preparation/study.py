"""One study from the scanner -> BraTS-ready input: :func:`prepare_study`.

Reads every series (:mod:`~custom.preparation.series`), registers every other series rigidly onto the reference
(``custom.data.vocabulary.default_reference``: T1ce, else FLAIR, else T1, else T2; :mod:`~custom.preparation.registration`),
extracts the brain (:mod:`~custom.preparation.brain`) on the series :func:`brain_series` picks, which also places the
model grid (:mod:`~custom.preparation.grid`), resamples all onto the grid with 0 outside the brain
(N4 on T1, T1ce and T2 by default) and writes ``<case>_<seq>.nii.gz`` (BraTS 2021 naming), ``<case>_brainmask.nii.gz`` and
``<case>_preparation.json``.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from custom.data.errors import OutputError
from custom.data.vocabulary import LAYOUTS, MODALITIES, REQUIRED_ANY, SEQUENCE_ALIASES, default_reference, describe_sequences
from custom.preparation.brain import METHODS, extract_brain, not_stripped, stripped_mask
from custom.preparation.errors import PreparationError
from custom.preparation.grid import ModelGrid, bias_correct, model_grid, resample_to_grid
from custom.preparation.registration import identity, register_rigid, single_threaded, working_image
from custom.preparation.series import image_affine, read_series

LAYOUT = LAYOUTS["brats2021"]


def output_name(case_id: str, sequence: str) -> str:
    """``<case>_<suffix>.nii.gz`` of a sequence of ``MODALITIES`` (BraTS 2021 naming)."""
    return f"{case_id}{LAYOUT.separator}{LAYOUT.suffixes[MODALITIES.index(sequence)]}.nii.gz"


def canonical_series(series: dict) -> dict[str, Path]:
    """``series`` with names mapped onto ``MODALITIES`` (any release's alias); checks the set."""
    out: dict[str, Path] = {}
    for name, path in series.items():
        seq = SEQUENCE_ALIASES.get(str(name).lower())
        if seq is None:
            raise PreparationError(f"unknown sequence {name!r} (expected one of {', '.join(sorted(SEQUENCE_ALIASES))})")
        if seq in out:
            raise PreparationError(f"sequence {describe_sequences([seq])} given twice ({out[seq]}, {path})")
        out[seq] = Path(path)
    if not any(s in out for s in REQUIRED_ANY):
        raise PreparationError(f"the study has {describe_sequences(out) or 'no series'}: it needs {' or '.join(describe_sequences([s]) for s in REQUIRED_ANY)}")
    return out


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nii = nib.Nifti1Image(data, affine)
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    try:
        nib.save(nii, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot be written ({e})") from e


REVISION = 7
"""Raised whenever ``prepare_study`` writes something else for the same input (2: the grid on the reference's voxel
lattice, N4 in 3 levels and on the T2 too; 3: the brain from a 3D T1-weighted series where the reference is not one;
4: the atlas' similarity start chosen by its agreement with deepbet's brain; 5: only by a clearly better agreement;
6: deepbet's brain guarded by the atlas' affine brain, without the B-spline step; 7: the registrations on one thread);
in the report, and in the DICOMweb datastore's cache key."""
T1_WEIGHTED = ("t1ce", "t1")
"""The sequences brain extraction prefers, in this order: deepbet learnt from T1-weighted heads, and the head model is one."""
MAX_3D_ANISOTROPY = 2.0
"""A series counts as 3D when its longest voxel side is at most this many times its shortest (1 x 1 x 1 mm, 0.5 x 0.5 x
1 mm); 2D series of 3-6 mm slices are 3-12 times as long across the slices as in plane."""
N4_SEQUENCES = ("t1", "t1ce", "t2")
"""The series N4 corrects by default: all but the FLAIR, on which N4 takes part of a large oedema's brightness for
bias (``benchmarks/results/real_acquisition_n4.md``, ``preparation_n4_3_levels.md``)."""
BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False, "none": False, "": False}


def bias_correction_option(names: list[str] | None):
    """A command line's ``--bias-correction [SEQ ...]`` (argparse ``nargs="*"``) as ``prepare_study``'s
    ``bias_correction``: not given -> :data:`N4_SEQUENCES`, given with no name -> every series, else the names."""
    return N4_SEQUENCES if names is None else (names or True)


def bias_corrected(bias_correction, sequences) -> list[str]:
    """The sequences of ``sequences`` that N4 corrects: all for ``True`` (or ``"true"``, as a command line gives it),
    none for ``False`` / ``None`` / ``"false"``, else those named in ``bias_correction`` (a list, or one string of
    comma-separated names of ``MODALITIES`` or aliases; a named sequence the study lacks is skipped).
    Raises ``ValueError`` for an unknown name."""
    if isinstance(bias_correction, str):
        bias_correction = [n.strip() for n in bias_correction.split(",")]
    if isinstance(bias_correction, (list, tuple)) and len(bias_correction) == 1 and str(bias_correction[0]).lower() in BOOL_WORDS:
        bias_correction = BOOL_WORDS[str(bias_correction[0]).lower()]
    if bias_correction is None or isinstance(bias_correction, bool):
        return list(sequences) if bias_correction else []
    wanted = set()
    for name in bias_correction:
        seq = SEQUENCE_ALIASES.get(str(name).lower())
        if seq is None:
            raise ValueError(f"bias_correction: unknown sequence {name!r} (expected true, false or names among {', '.join(MODALITIES)})")
        wanted.add(seq)
    return [s for s in sequences if s in wanted]


def brain_series(images: dict[str, sitk.Image], reference: str) -> str:
    """The series to extract the brain on: the ``reference`` if it is a 3D T1-weighted series (:data:`T1_WEIGHTED`,
    :data:`MAX_3D_ANISOTROPY`) or skull-stripped (its own brain, and its own axes for the grid), else the first 3D
    T1-weighted series of ``images`` (sequence -> series), else the reference (a FLAIR or a 2D T1ce beside a 3D T1:
    the brain comes from the T1; a T2 alone: from the T2)."""
    def is_3d(s: str) -> bool:
        spacing = images[s].GetSpacing()
        return max(spacing) <= MAX_3D_ANISOTROPY * min(spacing)

    if reference in T1_WEIGHTED and is_3d(reference):
        return reference
    other = next((s for s in T1_WEIGHTED if s in images and is_3d(s)), None)
    return reference if other is None or stripped_mask(images[reference]) is not None else other


def prepare_study(series: dict, out_dir: str | os.PathLike, reference: str | None = None, bias_correction: bool | list[str] = N4_SEQUENCES,
                  case_id: str = "case", spacing: float = 1.0, brain_method: str = "auto") -> dict:
    """Prepare one study; returns the report (also written as ``<out_dir>/<case_id>_preparation.json``).

    ``series``: sequence name (``t1``, ``t1ce``, ``t2``, ``flair`` or an alias) -> NIfTI path, any grid;
    FLAIR or T2 required. ``reference``: the series the others are registered to (default: T1ce, else
    FLAIR, else T1, else T2). ``bias_correction``: N4 on the named series (default :data:`N4_SEQUENCES`), on every
    series (``True``) or on none (``False``). ``spacing``: the model grid's voxel size (mm). Report: per series its file, grid
    and registration (rotation in degrees, translation in mm, mutual information, seconds); the
    reference and the model grid; the brain volume (mL), method and the series it was extracted on; total seconds
    (the brain extraction runs beside the registrations, so the steps' seconds add up to more).
    Raises :class:`PreparationError` for a study that cannot be prepared.
    """
    t0 = time.perf_counter()
    paths = canonical_series(series)
    if reference is None:
        reference = default_reference(paths)
    reference = SEQUENCE_ALIASES.get(str(reference).lower(), str(reference))
    if reference not in paths:
        raise PreparationError(f"reference {reference!r} is not one of the study's series ({describe_sequences(paths)})")
    if brain_method not in METHODS:
        raise ValueError(f"brain_method must be one of {METHODS}, got {brain_method!r}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot be created ({e})") from e
    order = [reference] + [s for s in MODALITIES if s in paths and s != reference]
    corrected = bias_corrected(bias_correction, order)
    images, seconds = {}, {}
    for s in order:
        t = time.perf_counter()
        images[s] = read_series(paths[s], describe_sequences([s]))
        seconds[s] = time.perf_counter() - t
    on = brain_series(images, reference)
    if brain_method == "skull-stripped" and stripped_mask(images[on]) is None:  # a refusal costs no registration
        raise not_stripped(describe_sequences([on]))
    ref_work = working_image(images[reference])
    lattice = image_affine(images[on])
    regs = {reference: identity(reference)}
    # the brain beside the registrations, each on one core: SimpleITK on one thread gives the same transforms every run
    with single_threaded(), ThreadPoolExecutor(1) as pool:
        brain_job = pool.submit(extract_brain, images[on], lambda points, rotation: model_grid(points, spacing, rotation, lattice=lattice),
                                brain_method, ref_work if on == reference else None)
        for s in order[1:]:
            regs[s] = register_rigid(images[reference], images[s], describe_sequences([s]), fixed_work=ref_work)
        brain = brain_job.result()
    grid, mask = brain["grid"], brain["mask"]
    if not mask.any():
        raise PreparationError(f"{describe_sequences([on])} series: no brain found")
    if on != reference:  # the grid from that series' world into the reference's
        grid = ModelGrid(grid.shape, np.linalg.inv(regs[on].matrix) @ grid.affine)
    report_series = {}
    for s in order:
        t = time.perf_counter()
        data = resample_to_grid(images[s], grid, regs[s].matrix)
        if s in corrected:
            data = bias_correct(data, mask)
        data = np.where(mask, data, 0).astype(np.float32)
        name = output_name(case_id, s)
        _save(data, grid.affine, out / name)
        src = nib.load(paths[s])
        report_series[s] = {"source": str(paths[s]), "output": name, "shape": [int(n) for n in src.shape[:3]],
                            "voxel_mm": [round(float(v), 4) for v in np.sqrt((src.affine[:3, :3] ** 2).sum(0))],
                            "axes": "".join(nib.aff2axcodes(src.affine)), "affine_ras": np.round(src.affine, 6).tolist(),
                            "registration": regs[s].to_dict(),
                            "seconds": round(seconds[s] + regs[s].seconds + time.perf_counter() - t, 2)}
    mask_name = f"{case_id}{LAYOUT.separator}brainmask.nii.gz"
    _save(mask.astype(np.uint8), grid.affine, out / mask_name)
    report = {
        "case_id": case_id, "revision": REVISION, "sequences": order,
        "reference": {"sequence": reference, **{k: report_series[reference][k] for k in ("source", "shape", "voxel_mm", "axes", "affine_ras")}},
        "grid": grid.to_dict(), "brain": {"mask": mask_name, "volume_ml": round(brain["volume_ml"], 1), "method": brain["method"], "series": on,
                                          "atlas_mutual_information": None if np.isnan(brain["metric"]) else round(brain["metric"], 4),
                                          "seconds": round(brain["seconds"], 2)},
        "bias_correction": corrected, "series": report_series, "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / f"{case_id}_preparation.json").write_text(json.dumps(report, indent=1))
    return report
