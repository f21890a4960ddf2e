"""Study preparation (``custom.preparation``) on generated raw studies, against the generator's truth.

    python -m benchmarks.preparation --out benchmarks/results/preparation.md     # about 20 min on 2 busy CPU cores
    python -m benchmarks.preparation --segment_only --variant bundle --variant retrained ckpt_path="'runs/x/model.pt'"

Builds ``--studies`` (8) raw studies of seed ``--seed`` (``custom.synthetic.raw_study``: full-size
cases in a head, every series on its own grid and pose, clinical voxel sizes) in ``--work_dir``,
prepares each with ``prepare_study`` (default brain method, 1 mm grid) and reports, per study and
mean: registration error per series (mm: mean displacement of the reference's brain voxels between
the true and the recovered transform), brain-mask Dice against the truth on the prepared grid, brain
volume (mL) and seconds of preparation; then the other brain-extraction methods on the same reference
(Dice, seconds of extraction alone); then (unless ``--no_segment``) the segmentation: the bundle's
``inference.json`` (as it is, or each ``--variant NAME [KEY=VALUE ...]`` of overrides) on the prepared studies, each label carried onto the reference
series (``map_to_reference``, what ``clinical.json`` writes), and on the BraTS-ready version of the same
cases, its label carried onto the same reference grid through the true pose (nearest neighbour, as the
truth is); both scored there against the generator's truth (Dice TC/WT/ET, BraTS rule for empty
regions), and against each other (agreement: mean Dice of the two labels over TC/WT/ET); also the
BraTS-ready cases with the preparation's N4 on the same sequences (the bundle applies no N4 to
BraTS-ready input; this column separates what the intensity correction changes from the rest).
``--segment_only`` repeats only the segmentation, on studies prepared before.
Targets of issue #16: error <= 1.5 mm, Dice >= 0.95, <= 60 s a study, segmentation within 0.05 Dice
of the BraTS-ready version's.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.step_runner import REPO, emit_tables, load_average, variants_from

TARGET_MM, TARGET_DICE, TARGET_S, TARGET_SEG = 1.5, 0.95, 60.0, 0.05
SEQUENCES = ("t1", "t1ce", "t2", "flair")


def mean_displacement(points: np.ndarray, true: np.ndarray, found: np.ndarray) -> float:
    """Mean distance (mm) between ``points`` (N, 3) mapped by the ``true`` and by the ``found`` 4x4 transform."""
    return float(np.linalg.norm(points @ (true[:3, :3] - found[:3, :3]).T + (true[:3, 3] - found[:3, 3]), axis=1).mean())


def registration_error(study, seq: str, matrix: np.ndarray) -> float:
    """Mean displacement (mm) of the reference's brain voxels between the true and the recovered transform."""
    return mean_displacement(study.brain_points(), study.true_transform(seq), matrix)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def run_study(i: int, seed: int, work: Path, methods: list[str], default: str, bias_correction: bool | list[str]) -> dict:
    import nibabel as nib

    from custom.preparation import extract_brain, prepare_study, read_series
    from custom.preparation.grid import model_grid
    from custom.synthetic.raw_study import generate_raw_study

    t0 = time.perf_counter()
    study = generate_raw_study(i, seed, work / f"raw_{seed}_{i:03d}", size="full")
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepared = work / f"prepared_{seed}" / study.case_id  # one BraTS 2021 dataset folder for the bundle
    report = prepare_study(study.series, prepared, case_id=study.case_id, brain_method=default, bias_correction=bias_correction)
    prep_s = time.perf_counter() - t0
    mask_img = nib.load(prepared / report["brain"]["mask"])
    mask = np.asarray(mask_img.dataobj) > 0
    truth, _ = study.truth_on_grid(mask.shape, mask_img.affine)
    row = {"study": study.case_id, "index": i, "raw": study, "prepared": prepared, "generate_s": gen_s, "prepare_s": prep_s, "reference": study.reference,
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
        r = extract_brain(ref, lambda points, rotation: model_grid(points, 1.0, rotation), m)
        t, _ = study.truth_on_grid(r["grid"].shape, r["grid"].affine)
        row["dice"][m], row["brain_s"][m] = dice(r["mask"], t), r["seconds"]
    return row


def region_dice(pred: np.ndarray, truth: np.ndarray, truth_convention: str = "brats2021") -> dict[str, float]:
    """Dice per region of a BraTS 2021 label map (what the bundle writes) against ``truth`` in
    ``truth_convention`` (both regions empty: 1)."""
    from benchmarks.real_mri import region_masks
    from custom.data import CONVENTIONS

    a, b = region_masks(pred, CONVENTIONS["brats2021"].region_labels), region_masks(truth, CONVENTIONS[truth_convention].region_labels)
    return {r: 1.0 if not a[r].any() and not b[r].any() else dice(a[r], b[r]) for r in a}


def segment(rows: list[dict], seed: int, work: Path, variants: dict[str, list[str]], bias_correction) -> list[str]:
    """Each of ``variants`` (name -> bundle overrides of ``inference.json``) on the prepared studies (labels carried onto the
    reference series), on the BraTS-ready cases and on those with N4 on the sequences ``bias_correction`` names
    (``prepare_study``'s argument); all against the truth. Returns the markdown lines."""
    lines = ["", "## Segmentation: prepared raw study against its BraTS-ready version"]
    for name, overrides in variants.items():
        lines += segment_variant(rows, seed, work, name, overrides, bias_correction)
    return lines


def bias_corrected_dataset(ready: Path, bias_correction) -> Path:
    """A copy of the BraTS 2021 dataset ``ready``, beside it, whose sequences named by ``bias_correction`` are N4-corrected
    inside the brain as ``prepare_study`` corrects them (``custom.preparation.grid.bias_correct``); made once."""
    import nibabel as nib

    from custom.preparation.grid import bias_correct
    from custom.preparation.study import bias_corrected

    corrected = bias_corrected(bias_correction, SEQUENCES)
    out = ready.with_name(f"{ready.name}_n4_{'_'.join(corrected) or 'none'}")
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".partial")
    for case in sorted(d for d in ready.iterdir() if d.is_dir()):
        (tmp / case.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(case.glob("*.nii.gz")):
            seq = f.name[len(case.name) + 1:].split(".")[0]
            img = nib.load(f)
            if seq in corrected:
                data = np.asarray(img.dataobj, dtype=np.float32)
                nib.save(nib.Nifti1Image(bias_correct(data, data > 0), img.affine), tmp / case.name / f.name)
            else:
                os.symlink(f.resolve(), tmp / case.name / f.name)
    tmp.rename(out)
    return out


def segment_variant(rows: list[dict], seed: int, work: Path, name: str, overrides: list[str], bias_correction) -> list[str]:
    """One variant's table: raw study against BraTS-ready (as it is and with N4), Dice per study (markdown lines)."""
    import json

    import nibabel as nib

    from benchmarks.real_mri import run_inference
    from custom.data import REGIONS
    from custom.handlers.checkpoints import file_sha256
    from custom.preparation import map_to_reference
    from custom.synthetic import write_dataset

    ready = work / f"ready_{seed}"
    if not ready.is_dir():
        write_dataset(ready, max(r["index"] for r in rows) + 1, seed=seed, layout="brats2021", size="full")
    config = [str(REPO / "bundle" / "configs" / "inference.json")]
    tag = "".join(c if c.isalnum() else "_" for c in name)
    seg_raw, seg_ready = work / f"seg_raw_{seed}_{tag}", work / f"seg_ready_{seed}_{tag}"
    raw_s, _ = run_inference(work / f"prepared_{seed}", seg_raw, config, overrides)
    ready_s, _ = run_inference(ready, seg_ready, config, overrides)
    n4 = n4_words(bias_correction)
    seg_ready_n4 = work / f"seg_ready_n4_{seed}_{tag}"
    run_inference(bias_corrected_dataset(ready, bias_correction), seg_ready_n4, config, overrides)
    version = json.loads((REPO / "bundle" / "configs" / "metadata.json").read_text())["version"]
    given = dict(o.split("=", 1) for o in overrides)
    weights = Path(ast.literal_eval(given["ckpt_path"])) if "ckpt_path" in given else REPO / "bundle" / "models" / "model.pt"
    lines = ["", f"### {name}" + (": " + " ".join(f"`{o}`" for o in overrides) if overrides else ": the bundle as it is"), "",
             f"The model of `{os.path.relpath(weights.resolve(), REPO)}` (sha256 {file_sha256(weights)[:12]}; bundle {version}, `inference.json`) "
             f"on the {len(rows)} prepared studies ({raw_s:.0f} s in all) and on the "
             f"BraTS-ready cases ({ready_s:.0f} s); raw-study labels carried onto the reference series (`map_to_reference`), "
             "BraTS-ready labels onto the same grid through the true pose; both scored there against the truth carried the same way. "
             f"Agreement: mean Dice of the raw and the BraTS-ready label over TC / WT / ET. Ready + N4: the BraTS-ready case with "
             f"the preparation's {n4} (the raw study is corrected, the BraTS-ready case is not).", "",
             "| study | raw TC / WT / ET | raw mean | BraTS-ready TC / WT / ET | ready mean | difference | agreement "
             "| ready + N4 mean | raw - (ready + N4) |",
             "|---|---|---|---|---|---|---|---|---|"]
    diffs, agreements, diffs_n4 = [], [], []
    for r in rows:
        study, case = r["raw"], f"BraTS2021_{r['index']:05d}"
        on_ref = map_to_reference(seg_raw / f"{study.case_id}.nii.gz", r["prepared"], seg_raw / f"{study.case_id}_on_reference.nii.gz")
        ref_img = nib.load(on_ref)
        _, truth = study.truth_on_grid(ref_img.shape, ref_img.affine)
        raw_label = np.asarray(ref_img.dataobj)
        ready_label = study.label_on_grid(np.asarray(nib.load(seg_ready / f"{case}.nii.gz").dataobj), ref_img.shape, ref_img.affine)
        d_raw = region_dice(raw_label, truth, "brats2023")  # the generator's label values (ET 3)
        d_ready = region_dice(ready_label, truth, "brats2023")
        ready_n4_label = study.label_on_grid(np.asarray(nib.load(seg_ready_n4 / f"{case}.nii.gz").dataobj), ref_img.shape, ref_img.affine)
        agree = np.mean(list(region_dice(raw_label, ready_label, "brats2021").values()))
        m_raw, m_ready = np.mean(list(d_raw.values())), np.mean(list(d_ready.values()))
        m_ready_n4 = np.mean(list(region_dice(ready_n4_label, truth, "brats2023").values()))
        diffs.append(m_raw - m_ready)
        diffs_n4.append(m_raw - m_ready_n4)
        agreements.append(agree)
        lines.append(f"| {study.case_id} | {' / '.join(f'{d_raw[g]:.3f}' for g in REGIONS)} | {m_raw:.3f} | "
                     f"{' / '.join(f'{d_ready[g]:.3f}' for g in REGIONS)} | {m_ready:.3f} | {m_raw - m_ready:+.3f} | {agree:.3f} | "
                     f"{m_ready_n4:.3f} | {m_raw - m_ready_n4:+.3f} |")
    below = sum(d < -TARGET_SEG for d in diffs)
    outside = sum(abs(d) > TARGET_SEG for d in diffs)
    lines += ["", f"Mean Dice difference raw - BraTS-ready: {np.mean(diffs):+.3f} (worst {min(diffs):+.3f}, largest |difference| "
              f"{max(abs(d) for d in diffs):.3f}; within {TARGET_SEG} or better: {len(diffs) - below} of {len(diffs)}; "
              f"within {TARGET_SEG} either way: {len(diffs) - outside} of {len(diffs)}; "
              f"{'target met' if not below else 'target MISSED'}). Agreement of the two labels: mean {np.mean(agreements):.3f}, "
              f"min {min(agreements):.3f}.  ",
              f"Against the BraTS-ready cases with N4: mean {np.mean(diffs_n4):+.3f}, largest |difference| {max(abs(d) for d in diffs_n4):.3f}, "
              f"within {TARGET_SEG} either way: {sum(abs(d) <= TARGET_SEG for d in diffs_n4)} of {len(diffs_n4)}."]
    return lines


def describe(acq: dict) -> str:
    v = acq["voxel_mm"]
    return f"{acq['orientation'][:3]} {v[0]:g}x{v[1]:g}x{v[2]:g}"


def n4_words(bias_correction) -> str:
    """What N4 corrected, in words: ``no N4``, ``N4 bias-field correction`` (every series) or ``N4 on T1, T1ce``."""
    from custom.data.vocabulary import MODALITIES, describe_sequences
    from custom.preparation.study import bias_corrected

    corrected = bias_corrected(bias_correction, MODALITIES)
    if len(corrected) == len(MODALITIES):
        return "N4 bias-field correction"
    return f"N4 on {describe_sequences(corrected)}" if corrected else "no N4"


def main(argv=None) -> int:
    from custom.preparation.brain import ATLAS_METHODS, METHODS
    from custom.preparation.study import bias_correction_option

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="markdown file for the tables (printed anyway)")
    ap.add_argument("--work_dir", type=Path, default=REPO / "runs" / "preparation", help="raw studies and prepared outputs")
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="auto", choices=METHODS, help="brain extraction of the timed preparation")
    ap.add_argument("--compare", nargs="*", default=list(ATLAS_METHODS), choices=METHODS, help="brain-extraction methods to compare")
    ap.add_argument("--bias_correction", nargs="*", metavar="SEQ",
                    help="N4 on the series named (none: no N4), or on every series with no name (default: prepare_study's N4_SEQUENCES)")
    ap.add_argument("--no_segment", action="store_true", help="skip the segmentation comparison")
    ap.add_argument("--variant", action="append", nargs="+", metavar="NAME [KEY=VALUE",
                    help="a name and the bundle overrides of one segmentation pipeline (VALUE a Python literal: ckpt_path='path'); "
                         "repeat to compare (default: the bundle as it is)")
    ap.add_argument("--segment_only", action="store_true",
                    help="only the segmentation comparison, on the studies already prepared in --work_dir (regenerated for their truth)")
    args = ap.parse_args(argv)
    variants = variants_from(ap, args.variant)
    args.bias_correction = bias_correction_option(args.bias_correction)
    if args.segment_only:
        return segment_prepared(args, variants, argv)
    t0 = time.perf_counter()
    rows = []
    for i in range(args.studies):
        row = run_study(i, args.seed, args.work_dir, args.compare, args.method, args.bias_correction)
        rows.append(row)
        print(f"[{row['study']}] errors {', '.join(f'{s} {e:.2f}' for s, e in row['errors'].items())} mm; "
              f"Dice {', '.join(f'{m} {d:.3f}' for m, d in row['dice'].items())}; {row['prepare_s']:.1f} s", flush=True)
    methods = [args.method] + [m for m in args.compare if m != args.method]
    command = "python -m benchmarks.preparation " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Study preparation on generated raw studies", "",
        f"`{command}`  ",
        f"{dt.datetime.now().isoformat(timespec='seconds')}, {platform.machine()}, load average {load_average()}; "
        f"{(time.perf_counter() - t0) / 60:.1f} min (preparation)  ",
        f"{args.studies} studies of `custom.synthetic.raw_study` seed {args.seed} (full-size cases, series on their own grids, "
        f"poses up to 10 degrees / 10 mm); `prepare_study` with brain method `{args.method}`, 1 mm grid, "
        f"{n4_words(args.bias_correction)}.  ",
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
    if not args.no_segment:
        lines += segment(rows, args.seed, args.work_dir, variants, args.bias_correction)
    emit_tables("\n".join(lines) + "\n", args.out)
    return 0


def segment_prepared(args, variants: dict[str, list[str]], argv) -> int:
    """``--segment_only``: the segmentation comparison on the studies ``main`` prepared before in ``--work_dir``."""
    from custom.synthetic.raw_study import generate_raw_study

    t0 = time.perf_counter()
    rows = []
    for i in range(args.studies):
        study = generate_raw_study(i, args.seed, args.work_dir / f"raw_{args.seed}_{i:03d}", size="full")  # deterministic: the truth
        prepared = args.work_dir / f"prepared_{args.seed}" / study.case_id
        if not (prepared / f"{study.case_id}_preparation.json").is_file():
            raise SystemExit(f"{prepared}: not prepared; run without --segment_only first (same --work_dir, --seed, --studies)")
        rows.append({"study": study.case_id, "index": i, "raw": study, "prepared": prepared})
    command = "python -m benchmarks.preparation " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = ["# Segmentation of prepared raw studies against their BraTS-ready versions", "", f"`{command}`  ",
             f"{dt.datetime.now().isoformat(timespec='seconds')}, {platform.machine()}, load average {load_average()}  ",
             f"{args.studies} studies of `custom.synthetic.raw_study` seed {args.seed}, prepared before in `{os.path.relpath(args.work_dir, REPO)}`."]
    lines += segment(rows, args.seed, args.work_dir, variants, args.bias_correction)
    lines += ["", f"{(time.perf_counter() - t0) / 60:.1f} min in all (regenerating the studies for their truth included)."]
    emit_tables("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
