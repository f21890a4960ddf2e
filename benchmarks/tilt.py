"""Pipelines side by side on real tumours resampled and tilted inside their grid.

    python -m benchmarks.tilt --real_dev ../shared/real-dev --variant bundle \\
        --variant "brain edge kept" brain_edge_mm=0 --out benchmarks/results/tilt.md

The expert-labelled BraTS 2015 cases (FLAIR + T1ce, ``benchmarks.real_mri``) are rotated about their
brain's centre inside their own 1 mm grid (images trilinear, the expert label nearest neighbour;
affine unchanged, so the model sees the head tilted against its axes, as a skull-stripped series in
scanner space reaches it) by each of ``--tilts`` degrees, about one fixed axis (Euler angles in the
proportion of ``--direction``). One more set is rotated by the largest tilt and back again: resampled
twice, not tilted (what registering and re-gridding a series does to it). ``inference.json`` (no CRF)
segments every set once per ``--variant NAME [KEY=VALUE ...]`` (bundle overrides, VALUE a Python
literal: ``ckpt_path='path'``), and each prediction is scored against the label moved the same way
(Dice per region, BraTS rule for empty regions). The images are written to a temporary folder and
removed (derived from patient images).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from benchmarks.real_acquisition import dice
from benchmarks.real_mri import BRATS2015_REGIONS, FILES_2015, PRED_REGIONS, region_masks, run_inference
from benchmarks.step_runner import emit_tables, variants_from
from custom.data import REGIONS
from custom.synthetic.fields import rotation
from devtools import REPO

BACK = "there and back"  # the set rotated by the largest tilt and back: resampled twice, not tilted


def euler_for(tilt_deg: float, direction: np.ndarray) -> np.ndarray:
    """Euler angles (degrees, ``custom.synthetic.fields.rotation``) in the proportion of ``direction``
    whose rotation turns by ``tilt_deg`` in all."""
    if tilt_deg == 0:
        return np.zeros(3)
    lo, hi = 0.0, 2.0 * tilt_deg / np.linalg.norm(direction)
    for _ in range(60):  # the total angle grows monotonically with the scale in this range
        mid = (lo + hi) / 2
        r = rotation(mid * direction)
        angle = np.rad2deg(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1)))
        lo, hi = (mid, hi) if angle < tilt_deg else (lo, mid)
    return (lo + hi) / 2 * direction


def tilt(volume: np.ndarray, affine: np.ndarray, centre_mm: np.ndarray, rotation_matrix: np.ndarray, order: int) -> np.ndarray:
    """``volume`` (voxel -> RAS ``affine``) rotated by ``rotation_matrix`` (3, 3) about ``centre_mm`` (RAS) on its own grid."""
    world = np.eye(4)
    world[:3, :3] = rotation_matrix
    world[:3, 3] = centre_mm - world[:3, :3] @ centre_mm
    m = np.linalg.inv(affine) @ np.linalg.inv(world) @ affine  # output voxel -> input voxel
    return ndi.affine_transform(volume, m[:3, :3], m[:3, 3], volume.shape, order=order)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--real_dev", required=True, type=Path, help="the real-dev folder (brats2015_flair_t1c/<case>/)")
    p.add_argument("--variant", action="append", nargs="+", required=True, metavar="NAME [KEY=VALUE",
                   help="a name and the bundle overrides of one pipeline (none: the bundle as it is); repeat to compare")
    p.add_argument("--tilts", type=float, nargs="+", default=[0.0, 6.0, 12.0, 18.0], help="total rotation in degrees (default 0 6 12 18)")
    p.add_argument("--direction", type=float, nargs=3, default=[10.0, 6.0, 3.0], help="Euler angles' proportion (x y z; default 10 6 3)")
    p.add_argument("--out", type=Path, help="markdown file for the tables (printed anyway); a .json beside it")
    args = p.parse_args(argv)
    variants = variants_from(p, args.variant)
    case_dirs = sorted((args.real_dev / "brats2015_flair_t1c").glob("*/"))
    if not case_dirs:
        p.error(f"{args.real_dev}: no brats2015_flair_t1c/<case>/ found")
    direction = np.asarray(args.direction, float)
    sets = [f"{t:g}" for t in args.tilts] + [BACK]
    configs = [str(REPO / "bundle" / "configs" / "inference.json")]
    rows, seconds = [], {}
    with tempfile.TemporaryDirectory(prefix="tilt_") as tmp:
        tmp = Path(tmp)
        truth = {}
        for d in case_dirs:
            ref = nib.load(d / FILES_2015["t1ce"])
            brain = np.asarray(nib.load(d / "brainmask.nii.gz").dataobj) > 0.5
            centre = ref.affine[:3, :3] @ np.argwhere(brain).mean(0) + ref.affine[:3, 3]
            label = np.asarray(nib.load(d / "OTMultiClass.nii.gz").dataobj).astype(np.int16)
            images = {}
            for s, f in FILES_2015.items():
                a = np.asarray(nib.load(d / f).dataobj, np.float32)
                images[s] = np.maximum(a - a[0, 0, 0], 0.0)  # z-scored, constant background -> background 0
            for t in sets:
                r = rotation(euler_for(max(args.tilts), direction)) if t == BACK else rotation(euler_for(float(t), direction))
                out = tmp / f"set_{t}" / d.name
                out.mkdir(parents=True)
                for s, a in images.items():
                    moved = tilt(a, ref.affine, centre, r, 1)
                    if t == BACK:
                        moved = tilt(moved, ref.affine, centre, r.T, 1)
                    nib.save(nib.Nifti1Image(moved.astype(np.float32), ref.affine), out / f"{d.name}_{s}.nii.gz")
                truth[(d.name, t)] = region_masks(label if t == BACK else tilt(label, ref.affine, centre, r, 0), BRATS2015_REGIONS)
        for name, overrides in variants.items():
            for t in sets:
                pred_dir = tmp / f"pred_{len(seconds)}"
                seconds[f"{name}, {t}"], _ = run_inference(tmp / f"set_{t}", pred_dir, configs, [*overrides, "use_crf=False"])
                for d in case_dirs:
                    pred = region_masks(np.asarray(nib.load(pred_dir / f"{d.name}.nii.gz").dataobj), PRED_REGIONS)
                    scores = {r: dice(pred[r], truth[(d.name, t)][r]) for r in REGIONS}
                    rows.append({"variant": name, "set": t, "case": d.name, "dice": scores, "mean": float(np.mean(list(scores.values())))})
    results = {"command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.tilt", *(argv or sys.argv[1:])]),
               "date": dt.datetime.now().isoformat(timespec="seconds"),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
               "variants": variants, "angles": {f"{t:g}": [round(v, 2) for v in euler_for(t, direction)] for t in args.tilts},
               "seconds": seconds, "rows": rows}
    emit_tables(report_text(results), args.out, results)
    return 0


def report_text(results: dict) -> str:
    rows, names = results["rows"], list(results["variants"])
    sets = list(dict.fromkeys(r["set"] for r in rows))
    cases = sorted({r["case"] for r in rows})
    at = {(r["variant"], r["set"], r["case"]): r for r in rows}
    lines = ["# Resampled and tilted real tumours: pipelines side by side", "", f"`{results['command']}`  ", f"{results['date']}, {results['machine']}  ",
             "Variants (bundle overrides of `inference.json`, no CRF): "
             + "; ".join(f"{n}: {' '.join(f'`{o}`' for o in v) or 'the bundle as it is'}" for n, v in results["variants"].items()) + ".  ",
             "Sets: the cases rotated inside their grid by the tilt (degrees; Euler angles x, y, z: "
             + ", ".join(f"{t}: {tuple(a)}" for t, a in results["angles"].items()) + f"), and '{BACK}': rotated by the largest and back.", "",
             "## Mean Dice over the BraTS 2015 cases (TC / WT / ET, mean)", "",
             "| set | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for t in sets:
        cells = []
        for n in names:
            sel = [at[(n, t, c)] for c in cases]
            per = {k: np.mean([r["dice"][k] for r in sel]) for k in REGIONS}
            cells.append(" / ".join(f"{per[k]:.3f}" for k in REGIONS) + f", **{np.mean([r['mean'] for r in sel]):.3f}**")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "## Mean Dice per case", "", "| case | set | " + " | ".join(names) + " |", "|---|---" + "|---" * len(names) + "|"]
    for c in cases:
        for t in sets:
            lines.append(f"| {c} | {t} | " + " | ".join(f"{at[(n, t, c)]['mean']:.3f}" for n in names) + " |")
    lines += ["", "Bundle runs (s, start-up included): " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
