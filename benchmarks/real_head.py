"""Brain extraction and registration on a real head with its skull, acquired again as a scanner would.

    apt-get download mricron-data && dpkg -x mricron-data_*.deb data/mricron
    python -m benchmarks.real_head --head data/mricron/usr/share/mricron/templates/ch2.nii.gz \\
        --brain data/mricron/usr/share/mricron/templates/ch2bet.nii.gz --out benchmarks/results/real_head.md

The real-dev cases are skull-stripped, so ``benchmarks.real_acquisition`` cannot try brain
extraction. This benchmark takes one real T1-weighted head with its skull, scalp, eyes and neck
(``--head``; Debian's ``mricron-data`` ships Colin 27, ``ch2.nii.gz``: one man scanned 27 times and
averaged, 1 mm) and a reference brain mask of it (``--brain``; ``ch2bet.nii.gz``, FSL BET's brain
of the same head, its largest connected part with holes filled). Each draw acquires the head twice
as ``custom.synthetic.raw_study`` acquires a generated one (``benchmarks.real_acquisition.acquire_case``
with the head's field of view and background): the reference series with a T1ce or a FLAIR protocol
(3D at 1 mm, or 2D slices of 4-5 mm), and a T2-protocol series, each with its own pose (up to 10
degrees and 10 mm), orientation, bias field and noise. On the reference, ``custom.preparation``'s
brain extraction (``"auto"``, the default, and the methods given to ``--compare``) is scored against
the reference brain carried onto the model grid through the true pose: Dice, the share of the
reference brain kept, and what lies more than ``OUTSIDE_MM`` outside it (mL: skull, scalp, eyes or
neck, as the CSF between the brain and the skull lies within a few mm). The T2-protocol series is
registered onto the reference (registration error in mm, as in ``benchmarks.preparation``).
The contrast is T1-weighted in every series (one real head, one contrast); the series are written
to a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from benchmarks.preparation import dice, mean_displacement
from benchmarks.real_acquisition import acquire_case, brain_points
from benchmarks.step_runner import emit_tables
from custom.preparation import METHODS, extract_brain, image_affine, read_series, register_rigid
from custom.preparation.grid import model_grid
from custom.preparation.registration import working_image

OUTSIDE_MM = 5.0
REFERENCES = ("t1ce", "flair")  # the reference series' protocol, draw by draw in turn (custom.synthetic.raw_study.PROTOCOLS)
MOVING = "t2"


def largest_filled(mask: np.ndarray) -> np.ndarray:
    """The largest connected part of ``mask`` (bool), holes filled."""
    lab, n = ndi.label(mask)
    if n == 0:
        raise SystemExit("the reference brain mask is empty")
    return ndi.binary_fill_holes(lab == int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)


def head_mask(head: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The head (bool): voxels above a tenth of the brain's 75th percentile, holes filled, largest part."""
    return largest_filled(ndi.binary_closing(head > 0.1 * np.percentile(head[brain], 75), iterations=2))


def score(mask: np.ndarray, truth: np.ndarray, spacing: float) -> dict:
    """Dice, share of ``truth`` kept, mL of ``mask`` more than :data:`OUTSIDE_MM` outside ``truth`` (voxels of ``spacing`` mm)."""
    outside = ndi.distance_transform_edt(~truth, sampling=spacing) > OUTSIDE_MM
    ml = spacing ** 3 / 1000.0
    return {"dice": dice(mask, truth), "kept": float((mask & truth).sum() / truth.sum()),
            "outside_ml": float((mask & outside).sum() * ml), "volume_ml": float(mask.sum() * ml), "truth_ml": float(truth.sum() * ml)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--head", required=True, type=Path, help="a real T1-weighted head with its skull (NIfTI)")
    p.add_argument("--brain", required=True, type=Path, help="its reference brain mask (NIfTI, > 0 inside, same grid)")
    p.add_argument("--draws", type=int, default=6, help="acquisitions (default 6; the reference protocol alternates T1ce, FLAIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs="*", default=[], choices=[m for m in METHODS if m != "auto"],
                   help="brain-extraction methods scored beside 'auto'")
    p.add_argument("--out", type=Path, help="markdown file for the tables (printed anyway); a .json beside it")
    args = p.parse_args(argv)
    head_nii, brain_nii = nib.load(args.head), nib.load(args.brain)
    if head_nii.shape[:3] != brain_nii.shape[:3] or not np.allclose(head_nii.affine, brain_nii.affine, atol=1e-3):
        p.error(f"{args.brain} is not on the grid of {args.head}")
    affine = head_nii.affine
    head = np.asarray(head_nii.dataobj, np.float32)
    brain = largest_filled(np.asarray(brain_nii.dataobj) > 0)
    covered = head_mask(head, brain)
    points = brain_points(brain, affine)
    methods = ["auto", *args.compare]
    rows = []
    with tempfile.TemporaryDirectory(prefix="real_head_") as tmp:
        for draw in range(args.draws):
            rng = np.random.default_rng([args.seed, draw, 29])
            ref_seq = REFERENCES[draw % len(REFERENCES)]
            series = acquire_case({ref_seq: head, MOVING: head}, brain, affine, rng, Path(tmp) / f"draw_{draw}", head=covered)
            reference = read_series(series[ref_seq]["path"], ref_seq)
            moving = read_series(series[MOVING]["path"], MOVING)
            ref_work = working_image(reference)
            lattice = image_affine(reference)
            pose = series[ref_seq]["pose"]
            t = time.perf_counter()
            reg = register_rigid(reference, moving, MOVING, fixed_work=ref_work)
            reg_s = time.perf_counter() - t
            error = mean_displacement(points @ pose[:3, :3].T + pose[:3, 3], series[MOVING]["pose"] @ np.linalg.inv(pose), reg.matrix)
            for method in methods:
                found = extract_brain(reference, lambda pts, rot: model_grid(pts, 1.0, rot, lattice=lattice), method, ref_work)
                grid = found["grid"]
                m = np.linalg.inv(affine) @ np.linalg.inv(pose) @ grid.affine  # model grid voxel -> head voxel
                truth = ndi.affine_transform(brain.astype(np.float32), m[:3, :3], m[:3, 3], grid.shape, order=1) >= 0.5
                row = {"draw": draw, "reference": f"{ref_seq} {series[ref_seq]['acquisition']}", "moving": series[MOVING]["acquisition"],
                       "pose": [round(series[ref_seq]["angle_deg"], 1), round(series[ref_seq]["shift_mm"], 1)],
                       "method": method, "used": found["method"], "seconds": found["seconds"],
                       "registration_error_mm": error, "registration_s": reg_s, **score(found["mask"], truth, grid.spacing)}
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                rows.append(row)
    results = {"command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.real_head", *(argv or sys.argv[1:])]),
               "date": dt.datetime.now().isoformat(timespec="seconds"),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", "rows": rows}
    emit_tables(report_text(results), args.out, results)
    return 0


def report_text(results: dict) -> str:
    rows = results["rows"]
    lines = ["# Brain extraction and registration on a real head with its skull (acquired again)", "",
             f"`{results['command']}`  ", f"{results['date']}, {results['machine']}  ",
             f"Reference brain: {rows[0]['truth_ml']:.0f} mL on the model grid. Outside: mL of the mask more than {OUTSIDE_MM:g} mm "
             "outside the reference brain.", "",
             "| draw | reference series | pose (deg / mm) | method | brain (mL) | Dice | reference brain kept | outside (mL) | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        method = r["method"] if r["used"] == r["method"] else f"{r['method']} ({r['used']})"
        lines.append(f"| {r['draw']} | {r['reference']} | {r['pose'][0]} / {r['pose'][1]} | {method} | {r['volume_ml']:.0f} | "
                     f"{r['dice']:.3f} | {r['kept']:.3f} | {r['outside_ml']:.1f} | {r['seconds']:.1f} |")
    lines += ["", "| method | Dice mean (min) | kept mean (min) | outside mean (max) mL | seconds mean |", "|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        col = {k: [r[k] for r in sel] for k in ("dice", "kept", "outside_ml", "seconds")}
        lines.append(f"| {method} | {np.mean(col['dice']):.3f} ({min(col['dice']):.3f}) | {np.mean(col['kept']):.3f} ({min(col['kept']):.3f}) | "
                     f"{np.mean(col['outside_ml']):.1f} ({max(col['outside_ml']):.1f}) | {np.mean(col['seconds']):.1f} |")
    draws = list({r["draw"]: r for r in rows}.values())
    lines += ["", "## Registration of the T2-protocol series onto the reference", "",
              "| draw | reference series | T2-protocol series | error (mm) | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['draw']} | {r['reference']} | {r['moving']} | {r['registration_error_mm']:.2f} | {r['registration_s']:.1f} |" for r in draws]
    errors = [r["registration_error_mm"] for r in draws]
    lines += ["", f"Registration error: mean {np.mean(errors):.2f} mm, max {max(errors):.2f} mm.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
