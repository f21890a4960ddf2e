"""The clinical path (``configs/clinical.json``) on real tumours acquired again as a scanner would.

    python -m benchmarks.real_acquisition --real_dev ../shared/real-dev --out benchmarks/results/real_acquisition.md

Every real-dev case (the BraTS 2015 cases' FLAIR + T1ce with expert labels; the BraTS 2023 case's
four sequences, no label) is acquired again, ``--draws`` times, series by series as
``custom.synthetic.raw_study`` acquires a generated head: its own rigid pose (up to 10 degrees and
10 mm), orientation, voxel size and slice thickness (``PROTOCOLS``: 3D T1ce, thick-slice or 3D
FLAIR, T1, T2), bias field and Rician noise, int16; the brain only, 0 outside (the cases are
skull-stripped: a skull-stripped export). The bundle with ``clinical.json`` segments these raw studies
(labels on the T1ce's own grid); ``inference.json`` segments the BraTS-ready cases, whose labels are
carried onto the same T1ce grid through the true pose. Both are scored on that grid: the BraTS 2015
cases against the expert label carried the same way (Dice per region, BraTS rule for empty
regions), the BraTS 2023 case as the agreement of the two. Also: the FLAIR's registration error (mm,
mean displacement of the brain's voxels between the true and the recovered transform).
Not tested here: brain extraction (the series keep their own brain). The raw series are written
to a temporary folder and removed (they are derived from patient images).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from benchmarks.preparation import mean_displacement
from benchmarks.real_mri import BRATS2015_REGIONS, FILES_2015, PRED_REGIONS, SUFFIX_2023, link_case, region_masks, run_inference
from benchmarks.step_runner import emit_tables
from custom.data import REGIONS
from custom.preparation.registration import rotation_angle_deg
from custom.synthetic.fields import rotation
from custom.synthetic.raw_study import HEAD_MARGIN_MM, PROTOCOLS, SLICE_AXIS, acquire, series_affine
from devtools import REPO

SERIES_NAMES = {"t1": "T1_MPRAGE", "t1ce": "3D_T1_POST_GD", "t2": "AX_T2_TSE", "flair": "T2_FLAIR"}  # read by clinical.json's series rules
TARGET_SEG = 0.05


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not a.any() and not b.any() else float(2 * (a & b).sum() / (a.sum() + b.sum()))


def acquire_case(images: dict[str, np.ndarray], brain: np.ndarray, affine: np.ndarray, rng: np.random.Generator,
                 out_dir: Path, head: np.ndarray | None = None, protocols: dict | None = None) -> dict[str, dict]:
    """Write every sequence of ``images`` (voxel -> RAS ``affine``, background 0) as a raw series of
    ``out_dir``; returns per sequence its file, pose (case world -> series world) and acquisition.
    ``protocols``: sequence -> protocols in place of ``PROTOCOLS``' (one drawn per series).

    Without ``head`` the series hold the brain only, 0 outside (a skull-stripped export); with ``head``
    (bool, ``brain.shape``) the field of view covers the head and the series keep their noisy background."""
    out_dir.mkdir(parents=True, exist_ok=True)
    covered = brain if head is None else head
    pts = np.argwhere(covered[::4, ::4, ::4]) * 4 @ affine[:3, :3].T + affine[:3, 3]
    centre = pts.mean(0)
    out = {}
    protocols = {**PROTOCOLS, **(protocols or {})}
    for s, img in images.items():
        voxel, orients = protocols[s][int(rng.integers(len(protocols[s])))]
        orientation = orients[int(rng.integers(len(orients)))]
        angles, shift = rng.uniform(-10.0, 10.0, 3), rng.uniform(-10.0, 10.0, 3)
        pose = np.eye(4)
        pose[:3, :3] = rotation(angles)
        pose[:3, 3] = centre - pose[:3, :3] @ centre + shift
        posed = pts @ pose[:3, :3].T + pose[:3, 3]
        lo, hi = posed.min(0), posed.max(0)
        ext = hi - lo + 2 * HEAD_MARGIN_MM
        axis = SLICE_AXIS[orientation]
        fov_in = max(rng.uniform(220.0, 256.0), max(ext[a] for a in range(3) if a != axis))
        shape = (int(np.ceil(fov_in / voxel[0])), int(np.ceil(fov_in / voxel[1])), int(np.ceil((ext[axis] + rng.uniform(0.0, 20.0)) / voxel[2])))
        aff = series_affine(rng, orientation, voxel, shape, (lo + hi) / 2 + rng.uniform(-4.0, 4.0, 3))
        level = float(np.percentile(img[brain], 75))  # ~ white matter = 1, the scale of the generator's noise
        data = acquire(rng, img / level, affine, pose, aff, shape, voxel[2], float(rng.uniform(15.0, 40.0)), float(rng.uniform(0.1, 0.3)))
        data = np.clip(np.rint(data * rng.uniform(300.0, 1500.0)), 1, 32767)
        if head is None:
            m = np.linalg.inv(affine) @ np.linalg.inv(pose) @ aff
            data = np.where(ndi.affine_transform(brain.astype(np.float32), m[:3, :3], m[:3, 3], shape, order=1) >= 0.5, data, 0)
        data = data.astype(np.int16)
        path = out_dir / f"{SERIES_NAMES[s]}.nii.gz"
        nii = nib.Nifti1Image(data, aff)
        nii.set_qform(aff, code=1)
        nii.set_sform(aff, code=1)
        nib.save(nii, path)
        out[s] = {"path": path, "pose": pose, "acquisition": f"{orientation[:3]} {'x'.join(f'{v:g}' for v in voxel)}",
                  "angle_deg": rotation_angle_deg(pose),
                  "shift_mm": float(np.linalg.norm(shift))}
    return out


def on_grid(label: np.ndarray, affine: np.ndarray, pose: np.ndarray, target: nib.Nifti1Image) -> np.ndarray:
    """``label`` (case grid, voxel -> RAS ``affine``) by nearest neighbour onto ``target``'s grid, seen through ``pose``."""
    m = np.linalg.inv(affine) @ np.linalg.inv(pose) @ target.affine
    return ndi.affine_transform(label.astype(np.int16), m[:3, :3], m[:3, 3], target.shape[:3], order=0)


def brain_points(brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return np.argwhere(brain[::2, ::2, ::2]) * 2 @ affine[:3, :3].T + affine[:3, 3]


def load_cases(root: Path) -> dict[str, dict]:
    """case -> {"images": seq -> float32 array (background 0), "brain", "brain_points" ((N, 3) RAS mm of every other
    brain voxel), "affine", "label" or None, "ready": seq -> path}."""
    cases = {}
    for d in sorted((root / "brats2015_flair_t1c").glob("*/")):
        ready = {s: d / f for s, f in FILES_2015.items()}
        ref = nib.load(ready["t1ce"])
        images = {}
        for s, p in ready.items():
            a = np.asarray(nib.load(p).dataobj, np.float32)
            images[s] = np.maximum(a - a[0, 0, 0], 0.0)  # z-scored, constant background -> background 0
        brain = np.asarray(nib.load(d / "brainmask.nii.gz").dataobj) > 0.5
        cases[d.name] = {"images": images, "brain": brain, "affine": ref.affine, "ready": ready, "brain_points": brain_points(brain, ref.affine),
                         "label": np.asarray(nib.load(d / "OTMultiClass.nii.gz").dataobj).astype(np.int16)}
    for d in sorted(root.glob("BraTS-GLI-*/")):
        ready = {s: d / f"{d.name}-{suffix}.nii.gz" for s, suffix in SUFFIX_2023.items()}
        images = {s: np.asarray(nib.load(p).dataobj, np.float32) for s, p in ready.items()}
        brain = ndi.binary_fill_holes(np.any([a > 0 for a in images.values()], axis=0))
        affine = nib.load(ready["t1ce"]).affine
        cases[d.name] = {"images": images, "brain": brain, "affine": affine, "ready": ready, "brain_points": brain_points(brain, affine), "label": None}
    return cases


def protocol_option(text: str) -> tuple[str, list]:
    """``SEQ=VOXELS:ORIENTATION`` (``t1ce=0.9x0.9x5:axial``) as ``(SEQ, [((0.9, 0.9, 5.0), ("axial",))])``, a
    ``PROTOCOLS`` entry. Raises ``ValueError`` naming what is wrong."""
    seq, _, rest = text.partition("=")
    voxels, _, orientation = rest.partition(":")
    try:
        voxel = tuple(float(v) for v in voxels.split("x"))
    except ValueError:
        voxel = ()
    if seq not in PROTOCOLS or len(voxel) != 3 or min(voxel) <= 0 or orientation not in SLICE_AXIS:
        raise ValueError(f"--protocol {text!r}: expected SEQ=AxBxC:ORIENTATION, SEQ one of {', '.join(PROTOCOLS)}, "
                         f"A, B, C positive mm, ORIENTATION one of {', '.join(SLICE_AXIS)}")
    return seq, [(voxel, (orientation,))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--real_dev", required=True, type=Path, help="the real-dev folder (brats2015_flair_t1c/, BraTS-GLI-*/)")
    p.add_argument("--draws", type=int, default=2, help="acquisitions per case (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", action="append", default=[], help="KEY=VALUE, passed to every bundle command (VALUE a Python literal: \"path\")")
    p.add_argument("--protocol", action="append", default=[], metavar="SEQ=VOXELS:ORIENTATION",
                   help="acquire SEQ with this protocol only, e.g. t1ce=0.9x0.9x5:axial (in-plane x in-plane x slice mm; "
                        "axial, sagittal or coronal); default: custom.synthetic.raw_study.PROTOCOLS")
    p.add_argument("--out", type=Path, help="markdown file for the tables (printed anyway); a .json beside it")
    args = p.parse_args(argv)
    try:
        protocols = dict(protocol_option(v) for v in args.protocol)
    except ValueError as e:
        p.error(str(e))
    overrides = [*args.override, "use_crf=False"]
    cases = load_cases(args.real_dev)
    if not cases:
        p.error(f"{args.real_dev}: neither brats2015_flair_t1c/<case>/ nor BraTS-GLI-*/ found")
    configs = [str(REPO / "bundle" / "configs" / "inference.json")]
    clinical = [*configs, str(REPO / "bundle" / "configs" / "clinical.json")]
    rows, seconds = [], {}
    with tempfile.TemporaryDirectory(prefix="real_acquisition_") as tmp:
        tmp = Path(tmp)
        for name, c in cases.items():
            link_case(tmp / "ready", name, c["ready"])
        seconds["ready"], _ = run_inference(tmp / "ready", tmp / "pred_ready", configs, overrides)
        for draw in range(args.draws):
            acquired = {}
            for i, (name, c) in enumerate(cases.items()):
                rng = np.random.default_rng([args.seed, i, draw, 17])
                acquired[name] = acquire_case(c["images"], c["brain"], c["affine"], rng, tmp / f"raw_{draw}" / name, protocols=protocols)
            seconds[f"raw {draw}"], _ = run_inference(tmp / f"raw_{draw}", tmp / f"pred_raw_{draw}", clinical, overrides)
            for name, c in cases.items():
                series = acquired[name]
                ref_img = nib.load(series["t1ce"]["path"])
                raw_img = nib.load(tmp / f"pred_raw_{draw}" / f"{name}.nii.gz")
                if raw_img.shape[:3] != ref_img.shape[:3] or not np.allclose(raw_img.affine, ref_img.affine, atol=1e-3):
                    raise SystemExit(f"{name}: the clinical label is not on the T1ce's grid ({raw_img.shape} vs {ref_img.shape})")
                raw = np.asarray(raw_img.dataobj).astype(np.int16)
                ready = on_grid(np.asarray(nib.load(tmp / "pred_ready" / f"{name}.nii.gz").dataobj), c["affine"], series["t1ce"]["pose"], ref_img)
                report = json.loads((tmp / f"pred_raw_{draw}" / "prepared" / name / f"{name}_preparation.json").read_text())
                pose_ref = series["t1ce"]["pose"]
                brain_ref = c["brain_points"] @ pose_ref[:3, :3].T + pose_ref[:3, 3]
                errors = {s: mean_displacement(brain_ref, series[s]["pose"] @ np.linalg.inv(pose_ref),
                                               np.array(report["series"][s]["registration"]["matrix_ras"], float))
                          for s in series if s != "t1ce"}
                rp, rr = region_masks(raw, PRED_REGIONS), region_masks(ready, PRED_REGIONS)
                row = {"case": name, "draw": draw, "acquisition": {s: series[s]["acquisition"] for s in series},
                       "pose": {s: [round(series[s]["angle_deg"], 1), round(series[s]["shift_mm"], 1)] for s in series},
                       "error_mm": errors, "brain_method": report["brain"]["method"], "prepare_s": report["seconds"]}
                if c["label"] is not None:
                    truth = region_masks(on_grid(c["label"], c["affine"], pose_ref, ref_img), BRATS2015_REGIONS)
                    row["raw"] = {r: dice(rp[r], truth[r]) for r in REGIONS}
                    row["ready"] = {r: dice(rr[r], truth[r]) for r in REGIONS}
                    row["difference"] = float(np.mean([row["raw"][r] - row["ready"][r] for r in REGIONS]))
                else:
                    row["agreement"] = {r: dice(rp[r], rr[r]) for r in REGIONS}
                rows.append(row)
    results = {"command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.real_acquisition", *(argv or sys.argv[1:])]),
               "date": dt.datetime.now().isoformat(timespec="seconds"),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
               "seconds": seconds, "rows": rows}
    emit_tables(report_text(results), args.out, results)
    return 0


def regions(scores: dict) -> str:
    return " / ".join(f"{scores[k]:.3f}" for k in REGIONS)


def report_text(results: dict) -> str:
    rows = results["rows"]
    lines = ["# The clinical path on real tumours acquired again (simulated acquisition of real-dev cases)", "",
             f"`{results['command']}`  ", f"{results['date']}, {results['machine']}  ",
             "Bundle runs (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()) + " (start-up included; no CRF)", "",
             "Raw: `inference.json` + `clinical.json` on the re-acquired series, label on the T1ce's own grid. Ready: `inference.json` on the "
             "BraTS-ready case, label carried onto the same grid through the true pose. Truth: the expert label carried the same way.", ""]
    labelled = [r for r in rows if "raw" in r]
    if labelled:
        lines += ["## BraTS 2015 expert labels (FLAIR + T1ce)", "",
                  "| case | draw | T1ce | FLAIR | FLAIR pose (deg, mm) | FLAIR error (mm) | raw TC / WT / ET | ready TC / WT / ET | difference |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in labelled:
            lines.append(f"| {r['case']} | {r['draw']} | {r['acquisition']['t1ce']} | {r['acquisition']['flair']} | "
                         f"{r['pose']['flair'][0]} / {r['pose']['flair'][1]} (T1ce {r['pose']['t1ce'][0]} / {r['pose']['t1ce'][1]}) | "
                         f"{r['error_mm']['flair']:.2f} | {regions(r['raw'])} | {regions(r['ready'])} | {r['difference']:+.3f} |")
        diffs = [r["difference"] for r in labelled]
        raw_mean = {k: float(np.mean([r["raw"][k] for r in labelled])) for k in REGIONS}
        ready_mean = {k: float(np.mean([r["ready"][k] for r in labelled])) for k in REGIONS}
        lines += [f"| **mean** | | | | | {np.mean([r['error_mm']['flair'] for r in labelled]):.2f} | "
                  f"{regions(raw_mean)} ({np.mean(list(raw_mean.values())):.3f}) | "
                  f"{regions(ready_mean)} ({np.mean(list(ready_mean.values())):.3f}) | {np.mean(diffs):+.3f} |", "",
                  f"Mean Dice difference raw - ready: {np.mean(diffs):+.3f} (worst {min(diffs):+.3f}; within {TARGET_SEG} or better in "
                  f"{sum(d >= -TARGET_SEG for d in diffs)} of {len(diffs)})."]
    others = [r for r in rows if "agreement" in r]
    if others:
        lines += ["", "## BraTS 2023 case, four sequences, no label: raw against ready (Dice of the two labels)", "",
                  "| case | draw | acquisitions | registration error (mm) | TC | WT | ET |", "|---|---|---|---|---|---|---|"]
        for r in others:
            acq = ", ".join(f"{s} {a}" for s, a in r["acquisition"].items())
            err = ", ".join(f"{s} {e:.2f}" for s, e in r["error_mm"].items())
            lines.append(f"| {r['case']} | {r['draw']} | {acq} | {err} | " + " | ".join(f"{r['agreement'][k]:.3f}" for k in REGIONS) + " |")
    errors = [e for r in rows for e in r["error_mm"].values()]
    lines += ["", f"Registration error over {len(errors)} series: mean {np.mean(errors):.2f} mm, max {max(errors):.2f} mm; "
              f"brain: {', '.join(sorted({r['brain_method'] for r in rows}))}; preparation {np.mean([r['prepare_s'] for r in rows]):.1f} s a study "
              f"on average ({max(r['prepare_s'] for r in rows):.1f} s at worst).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
