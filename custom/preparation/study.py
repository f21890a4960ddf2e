"""One study from the scanner -> BraTS-ready input: :func:`prepare_study`.

Reads every series (:mod:`~custom.preparation.series`), extracts the brain on the reference series
(``custom.data.vocabulary.default_reference``: T1ce, else FLAIR, else T1, else T2; :mod:`~custom.preparation.brain`), which also places the model
grid (:mod:`~custom.preparation.grid`), registers every other series rigidly onto the reference
(:mod:`~custom.preparation.registration`), resamples all onto the grid with 0 outside the brain
(N4 on T1, T1ce and T2 by default) and writes ``<case>_<seq>.nii.gz`` (BraTS 2021 naming), ``<case>_brainmask.nii.gz`` and
``<case>_preparation.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.data.errors import OutputError
from custom.data.vocabulary import LAYOUTS, MODALITIES, REQUIRED_ANY, SEQUENCE_ALIASES, default_reference, describe_sequences
from custom.preparation.brain import METHODS, extract_brain
from custom.preparation.errors import PreparationError
from custom.preparation.grid import bias_correct, model_grid, resample_to_grid
from custom.preparation.registration import identity, register_rigid, working_image
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


REVISION = 2
"""Raised whenever ``prepare_study`` writes something else for the same input (2: the grid on the reference's voxel
lattice, N4 in 3 levels and on the T2 too); in the report, and in the DICOMweb datastore's cache key."""
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


def prepare_study(series: dict, out_dir: str | os.PathLike, reference: str | None = None, bias_correction: bool | list[str] = N4_SEQUENCES,
                  case_id: str = "case", spacing: float = 1.0, brain_method: str = "auto") -> dict:
    """Prepare one study; returns the report (also written as ``<out_dir>/<case_id>_preparation.json``).

    ``series``: sequence name (``t1``, ``t1ce``, ``t2``, ``flair`` or an alias) -> NIfTI path, any grid;
    FLAIR or T2 required. ``reference``: the series the others are registered to (default: T1ce, else
    FLAIR, else T1, else T2). ``bias_correction``: N4 on the named series (default :data:`N4_SEQUENCES`), on every
    series (``True``) or on none (``False``). ``spacing``: the model grid's voxel size (mm). Report: per series its file, grid
    and registration (rotation in degrees, translation in mm, mutual information, seconds); the
    reference and the model grid; the brain volume (mL) and method; total seconds.
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
    ref_work = working_image(images[reference])
    lattice = image_affine(images[reference])
    brain = extract_brain(images[reference], lambda points, rotation: model_grid(points, spacing, rotation, lattice=lattice), brain_method, ref_work)
    grid, mask = brain["grid"], brain["mask"]
    if not mask.any():
        raise PreparationError(f"{describe_sequences([reference])} series: no brain found")
    regs = {reference: identity(reference)}
    for s in order[1:]:
        regs[s] = register_rigid(images[reference], images[s], describe_sequences([s]), fixed_work=ref_work)
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
        "grid": grid.to_dict(), "brain": {"mask": mask_name, "volume_ml": round(brain["volume_ml"], 1), "method": brain["method"],
                                          "atlas_mutual_information": None if np.isnan(brain["metric"]) else round(brain["metric"], 4),
                                          "seconds": round(brain["seconds"], 2)},
        "bias_correction": corrected, "series": report_series, "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / f"{case_id}_preparation.json").write_text(json.dumps(report, indent=1))
    return report
