"""N4's fitting levels (``custom.preparation.grid.bias_correct``) on images with a known bias field.

    python -m benchmarks.n4_levels --real_dev ../shared/real-dev --out benchmarks/results/n4_levels.md

Each image (the real-dev BraTS 2015 cases' FLAIR and T1ce, a generated case's T2 and FLAIR, all skull-stripped)
gets a smooth random field (``custom.synthetic.fields.smooth_field``, as ``custom.synthetic.raw_study`` draws it:
3 frequencies across the grid, ``exp(0.25 * field)``) and is corrected with 1 to 4 levels. Reported: the field
left (standard deviation of log(corrected / original) in the brain: 0 is a perfect correction) and how much of
the tumour's contrast (mean in the tumour over mean in the rest of the brain, against the original's) went with it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.real_mri import FILES_2015
from benchmarks.step_runner import emit_tables
from custom.preparation.grid import bias_correct
from custom.synthetic import write_dataset
from custom.synthetic.fields import smooth_field

LEVELS = (1, 2, 3, 4)


def images(real_dev: Path, tmp: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, image with background 0, brain, tumour) of every image measured."""
    out = []
    for d in sorted((real_dev / "brats2015_flair_t1c").glob("*/")):
        brain = np.asarray(nib.load(d / "brainmask.nii.gz").dataobj) > 0.5
        tumour = np.asarray(nib.load(d / "OTMultiClass.nii.gz").dataobj) > 0
        for s, f in FILES_2015.items():
            a = np.asarray(nib.load(d / f).dataobj, np.float32)
            out.append((f"{d.name} {s}", np.maximum(a - a[0, 0, 0], 0.0), brain, tumour))
    write_dataset(tmp, 2, seed=0, layout="brats2021", size="full")
    case = tmp / "BraTS2021_00001"
    tumour = np.asarray(nib.load(case / "BraTS2021_00001_seg.nii.gz").dataobj) > 0
    for s in ("t2", "flair"):
        a = np.asarray(nib.load(case / f"BraTS2021_00001_{s}.nii.gz").dataobj, np.float32)
        a = a - a.min()
        out.append((f"generated BraTS2021_00001 {s}", a, a > 0, tumour))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--real_dev", required=True, type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, a, brain, tumour in images(args.real_dev, Path(tmp)):
            biased = a * np.exp(0.25 * smooth_field(rng, a.shape, 1.0, 3, 1.0))
            inside = brain & (a > 0.05 * a[brain].mean())
            contrast = a[tumour].mean() / a[brain & ~tumour].mean()
            row = {"image": name}
            for levels in (0, *LEVELS):
                c = biased if levels == 0 else bias_correct(biased, brain, levels=levels)
                row[levels] = (float(np.std(np.log(np.maximum(c[inside], 1e-6) / a[inside]))),
                               float(c[tumour].mean() / c[brain & ~tumour].mean() / contrast - 1.0))
            rows.append(row)
            print(name, {k: tuple(round(v, 3) for v in row[k]) for k in row if k != "image"}, flush=True)
    lines = ["# N4's fitting levels on images with a known bias field", "",
             f"`{shlex.join(['python', '-m', 'benchmarks.n4_levels', *(argv or sys.argv[1:])])}`  ",
             f"{dt.datetime.now().isoformat(timespec='seconds')}", "",
             "Field left (std of log corrected / original in the brain) / change of the tumour's contrast; 0 levels: the field uncorrected.", "",
             "| image | " + " | ".join(["no N4", *(f"{n} levels" for n in LEVELS)]) + " |", "|---|" + "---|" * (len(LEVELS) + 1)]
    for r in rows:
        lines.append(f"| {r['image']} | " + " | ".join(f"{r[n][0]:.3f} / {r[n][1]:+.3f}" for n in (0, *LEVELS)) + " |")
    lines.append("| **mean** | " + " | ".join(f"{np.mean([r[n][0] for r in rows]):.3f} / {np.mean([r[n][1] for r in rows]):+.3f}"
                                            for n in (0, *LEVELS)) + " |")
    emit_tables("\n".join(lines) + "\n", args.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
