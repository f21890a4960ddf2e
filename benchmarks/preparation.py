"""Study preparation (``custom.preparation``) on generated raw studies, against the generator's truth.

    python -m benchmarks.preparation --out benchmarks/results/preparation.md     # about 20 min on 2 busy CPU cores

Builds ``--studies`` (8) raw studies of seed ``--seed`` (``custom.synthetic.raw_study``: full-size
cases in a head, every series on its own grid and pose, clinical voxel sizes) in ``--work_dir``,
prepares each with ``prepare_study`` (default brain method, 1 mm grid) and reports, per study and
mean: registration error per series (mm: mean displacement of the reference's brain voxels between
the true and the recovered transform), brain-mask Dice against the truth on the prepared grid, brain
volume (mL) and seconds of preparation; then the other brain-extraction methods on the same reference
(Dice, seconds of extraction alone). Targets of issue #16: error <= 1.5 mm, Dice >= 0.95, <= 60 s a study.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.step_runner import REPO, emit_tables, load_average

TARGET_MM, TARGET_DICE, TARGET_S = 1.5, 0.95, 60.0
SEQUENCES = ("t1", "t1ce", "t2", "flair")


def registration_error(study, seq: str, matrix: np.ndarray) -> float:
    """Mean displacement (mm) of the reference's brain voxels between the true and the recovered transform."""
    pts = study.brain_points()
    true = study.true_transform(seq)
    return float(np.linalg.norm(pts @ (true[:3, :3] - matrix[:3, :3]).T + (true[:3, 3] - matrix[:3, 3]), axis=1).mean())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def run_study(i: int, seed: int, work: Path, methods: list[str], default: str) -> dict:
    import nibabel as nib

    from custom.preparation import extract_brain, prepare_study, read_series
    from custom.preparation.grid import model_grid
    from custom.synthetic.raw_study import generate_raw_study

    t0 = time.perf_counter()
    study = generate_raw_study(i, seed, work / f"raw_{seed}_{i:03d}", size="full")
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = prepare_study(study.series, work / f"prepared_{seed}_{i:03d}", case_id=study.case_id, brain_method=default)
    prep_s = time.perf_counter() - t0
    mask_img = nib.load(work / f"prepared_{seed}_{i:03d}" / report["brain"]["mask"])
    mask = np.asarray(mask_img.dataobj) > 0
    truth, _ = study.truth_on_grid(mask.shape, mask_img.affine)
    row = {"study": study.case_id, "generate_s": gen_s, "prepare_s": prep_s, "reference": study.reference,
           "acq": {s: study.acquisitions[s] for s in SEQUENCES},
           "errors": {s: registration_error(study, s, np.array(report["series"][s]["registration"]["matrix_ras"]))
                      for s in SEQUENCES if s != study.reference},
           "mi": {s: report["series"][s]["registration"]["mutual_information"] for s in SEQUENCES if s != study.reference},
           "dice": {default: dice(mask, truth)}, "brain_s": {default: report["brain"]["seconds"]},
           "brain_ml": report["brain"]["volume_ml"], "truth_ml": float(truth.sum() / 1000.0)}
    ref = read_series(study.series[study.reference])
    for m in methods:
        if m == default:
            continue
        r = extract_brain(ref, lambda lo, hi: model_grid(lo, hi, 1.0), m)
        t, _ = study.truth_on_grid(r["grid"].shape, r["grid"].affine)
        row["dice"][m], row["brain_s"][m] = dice(r["mask"], t), r["seconds"]
    return row


def describe(acq: dict) -> str:
    v = acq["voxel_mm"]
    return f"{acq['orientation'][:3]} {v[0]:g}x{v[1]:g}x{v[2]:g}"


def main(argv=None) -> int:
    from custom.preparation.brain import ATLAS_METHODS, METHODS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="markdown file for the tables (printed anyway)")
    ap.add_argument("--work_dir", type=Path, default=REPO / "runs" / "preparation", help="raw studies and prepared outputs")
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="auto", choices=METHODS, help="brain extraction of the timed preparation")
    ap.add_argument("--compare", nargs="*", default=list(ATLAS_METHODS), choices=METHODS, help="brain-extraction methods to compare")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for i in range(args.studies):
        row = run_study(i, args.seed, args.work_dir, args.compare, args.method)
        rows.append(row)
        print(f"[{row['study']}] errors {', '.join(f'{s} {e:.2f}' for s, e in row['errors'].items())} mm; "
              f"Dice {', '.join(f'{m} {d:.3f}' for m, d in row['dice'].items())}; {row['prepare_s']:.1f} s", flush=True)
    methods = [args.method] + [m for m in args.compare if m != args.method]
    command = "python -m benchmarks.preparation " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Study preparation on generated raw studies", "",
        f"`{command}`  ",
        f"{dt.datetime.now().isoformat(timespec='seconds')}, {platform.machine()}, load average {load_average()} "
        f"(another benchmark shared the 2 cores); {(time.perf_counter() - t0) / 60:.1f} min  ",
        f"{args.studies} studies of `custom.synthetic.raw_study` seed {args.seed} (full-size cases, series on their own grids, "
        f"poses up to 10 degrees / 10 mm); `prepare_study` with brain method `{args.method}`, 1 mm grid, no N4.  ",
        f"Targets: registration error <= {TARGET_MM} mm, brain-mask Dice >= {TARGET_DICE}, <= {TARGET_S:g} s a study.", "",
        "## Registration error (mm) and preparation", "",
        "| study | reference | T1 | T2 | FLAIR | worst (mm) | brain Dice | brain mL (truth) | preparation (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for s in ("t1", "t2", "flair"):
            cells.append(f"{r['errors'][s]:.2f} ({describe(r['acq'][s])})" if s in r["errors"] else "reference")
        lines.append(f"| {r['study']} | {r['reference']} ({describe(r['acq'][r['reference']])}) | {' | '.join(cells)} | "
                     f"{max(r['errors'].values()):.2f} | {r['dice'][args.method]:.3f} | {r['brain_ml']:.0f} ({r['truth_ml']:.0f}) | {r['prepare_s']:.1f} |")
    all_err = [e for r in rows for e in r["errors"].values()]
    worst = [max(r["errors"].values()) for r in rows]
    dices = [r["dice"][args.method] for r in rows]
    secs = [r["prepare_s"] for r in rows]
    lines.append(f"| **mean** | | | | | {np.mean(worst):.2f} | {np.mean(dices):.3f} | | {np.mean(secs):.1f} |")
    lines += [
        "", f"Registration error over all {len(all_err)} series: mean {np.mean(all_err):.2f} mm, max {np.max(all_err):.2f} mm "
        f"({'target met' if np.max(all_err) <= TARGET_MM else f'target MISSED by {sum(e > TARGET_MM for e in all_err)} series'}).  ",
        f"Brain-mask Dice: mean {np.mean(dices):.3f}, min {np.min(dices):.3f} "
        f"({'target met' if np.min(dices) >= TARGET_DICE else f'target MISSED in {sum(d < TARGET_DICE for d in dices)} of {len(dices)} studies'}).  ",
        f"Preparation: mean {np.mean(secs):.1f} s, max {np.max(secs):.1f} s a study "
        f"({'target met' if np.max(secs) <= TARGET_S else f'target MISSED in {sum(s > TARGET_S for s in secs)} of {len(secs)} studies'}; "
        f"generating a study took {np.mean([r['generate_s'] for r in rows]):.1f} s, not counted).", "",
        "## Brain extraction methods (same reference series)", "",
        "| method | " + " | ".join(r["study"][-5:] for r in rows) + " | mean Dice | min Dice | mean s (extraction alone) |",
        "|---|" + "---|" * (len(rows) + 3),
    ]
    for m in methods:
        d = [r["dice"][m] for r in rows]
        lines.append(f"| `{m}` | " + " | ".join(f"{x:.3f}" for x in d) + f" | {np.mean(d):.3f} | {np.min(d):.3f} | "
                     f"{np.mean([r['brain_s'][m] for r in rows]):.1f} |")
    emit_tables("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
