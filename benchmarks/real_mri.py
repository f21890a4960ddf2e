"""The bundle's model on real MRI: expert-labelled BraTS 2015 cases (FLAIR + T1ce) and a BraTS 2023 case.

    python -m benchmarks.real_mri --real_dev ../shared/real-dev --out benchmarks/results/real_mri.md

Runs the bundle's own ``inference.json`` (``python -m monai.bundle run inference``, as a user
would; ``--override KEY=VALUE``, VALUE a Python literal as that command reads it (``False``, ``"path"``), and ``--config`` add to it) on

* ``brats2015_flair_t1c/<case>/``: ``Flair_subtrMeanDivStd`` and ``T1c_subtrMeanDivStd`` (z-scored,
  constant background) with T1 and T2 absent, against ``OTMultiClass`` (BraTS 2015 labels:
  1 necrosis, 2 oedema, 3 non-enhancing tumour, 4 enhancing tumour; TC = 1 + 3 + 4, WT = all,
  ET = 4): Dice and HD95 (mm) per region and case, with the BraTS rule for empty masks (both
  empty: Dice 1, HD95 0; one empty: Dice 0, HD95 373.13 mm);
* ``BraTS-GLI-*/`` (BraTS 2023 naming, no label): predicted volumes in mL with all four sequences
  and with FLAIR + T1ce only.

The cases are presented to the bundle through a temporary folder of symbolic links in the BraTS
2021 naming (nothing is copied). Overlays (FLAIR, T1ce, expert label, prediction on the axial
slice with the most tumour) are written as PNG to ``--images_dir`` (default
``runs/real_mri``, outside the repository: derived from patient images). Every run is one
subprocess; the wall time per case includes loading, preprocessing, the network, the CRF and
writing, but not the Python start-up and model building (reported separately).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.step_runner import emit_tables
from custom.data import CONVENTIONS, REGIONS
from custom.metrics import region_metrics
from devtools import REPO

BRATS2015_REGIONS = {"TC": (1, 3, 4), "WT": (1, 2, 3, 4), "ET": (4,)}  # 2015 labels: 1 necrosis, 2 oedema, 3 non-enhancing, 4 ET
PRED_REGIONS = CONVENTIONS["brats2021"].region_labels  # what the bundle writes for a BraTS 2021-named dataset
FILES_2015 = {"flair": "Flair_subtrMeanDivStd.nii.gz", "t1ce": "T1c_subtrMeanDivStd.nii.gz"}
SUFFIX_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}


def link_case(dst_root: Path, case_id: str, files: dict[str, Path]) -> None:
    """``dst_root/<case_id>/<case_id>_<seq>.nii.gz`` -> ``files[seq]`` (BraTS 2021 naming)."""
    d = dst_root / case_id
    d.mkdir(parents=True, exist_ok=True)
    for seq, src in files.items():
        os.symlink(src.resolve(), d / f"{case_id}_{seq}.nii.gz")


def run_inference(dataset_dir: Path, output_dir: Path, configs: list[str], overrides: list[str]) -> tuple[float, str]:
    """One ``monai.bundle run inference``; returns (wall seconds, log)."""
    config_arg = configs[0] if len(configs) == 1 else "[" + ",".join(repr(c) for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", config_arg,
           "--logging_file", str(REPO / "bundle" / "configs" / "logging.conf"),
           "--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir)]
    for o in overrides:
        key, _, value = o.partition("=")
        cmd += [f"--{key}", value]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"inference failed ({shlex.join(cmd)}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return seconds, r.stdout + r.stderr


def region_masks(label: np.ndarray, regions: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {r: np.isin(label, v) for r, v in regions.items()}


def overlay_png(path: Path, flair: np.ndarray, t1ce: np.ndarray, ref: np.ndarray | None, pred: np.ndarray, title: str) -> None:
    """FLAIR, T1ce, expert label (if any) and prediction on the axial slice with the most tumour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    basis = ref if ref is not None and ref.any() else pred
    z = int(np.argmax((basis > 0).sum((0, 1))))
    cmap = ListedColormap([(0, 0, 0, 0), (1.0, 0.2, 0.2, 0.6), (0.2, 0.9, 0.2, 0.45), (1.0, 1.0, 0.2, 0.6)])

    def regions_to_index(lab, regions):
        m = region_masks(lab, regions)
        out = np.zeros(lab.shape, np.uint8)
        out[m["WT"]] = 2
        out[m["TC"]] = 1
        out[m["ET"]] = 3
        return out

    panels = [("FLAIR", flair, None), ("T1ce", t1ce, None)]
    if ref is not None:
        panels.append(("expert", flair, regions_to_index(ref, BRATS2015_REGIONS)))
    panels.append(("prediction", flair, regions_to_index(pred, PRED_REGIONS)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (name, img, lab) in zip(axes, panels):
        sl = np.rot90(img[:, :, z])
        brain = sl[sl != sl.min()] if (sl != sl.min()).any() else sl
        ax.imshow(sl, cmap="gray", vmin=np.percentile(brain, 1), vmax=np.percentile(brain, 99.5))
        if lab is not None:
            ax.imshow(np.rot90(lab[:, :, z]), cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title} (slice {z}; red TC, green ED, yellow ET)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--real_dev", required=True, type=Path, help="the real-dev folder (brats2015_flair_t1c/, BraTS-GLI-*/)")
    p.add_argument("--out", type=Path, help="markdown file for the tables (printed anyway); a .json beside it")
    p.add_argument("--images_dir", type=Path, default=REPO / "runs" / "real_mri", help="overlay PNGs (default runs/real_mri)")
    p.add_argument("--config", action="append", default=[], help="extra config file(s) merged after inference.json")
    p.add_argument("--override", action="append", default=[], help="KEY=VALUE, passed to the bundle command (VALUE a Python literal: False, 0.3, \"path\")")
    p.add_argument("--crf", choices=("both", "on", "off"), default="both", help="run with the CRF, without, or both (default)")
    p.add_argument("--label", default="shipped model", help="name of this model in the tables")
    args = p.parse_args(argv)
    root = args.real_dev
    labelled = sorted(d for d in (root / "brats2015_flair_t1c").iterdir() if d.is_dir()) if (root / "brats2015_flair_t1c").is_dir() else []
    unlabelled = sorted(d for d in root.glob("BraTS-GLI-*") if d.is_dir())
    if not labelled and not unlabelled:
        p.error(f"{root}: neither brats2015_flair_t1c/<case>/ nor BraTS-GLI-*/ found")
    configs = [str(REPO / "bundle" / "configs" / "inference.json"), *args.config]
    crf_modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.crf]
    results: dict = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "date": dt.datetime.now().isoformat(timespec="seconds"),
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
                     "configs": [os.path.relpath(c, REPO) for c in configs], "overrides": args.override, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="real_mri_") as tmp:
        tmp = Path(tmp)
        ds_2015, ds_2023, ds_2023_two = tmp / "brats2015", tmp / "gli4", tmp / "gli2"
        for d in labelled:
            link_case(ds_2015, d.name, {seq: d / f for seq, f in FILES_2015.items()})
        for d in unlabelled:
            files = {seq: d / f"{d.name}-{suffix}.nii.gz" for seq, suffix in SUFFIX_2023.items()}
            link_case(ds_2023, d.name, files)
            link_case(ds_2023_two, d.name, {s: files[s] for s in ("t1ce", "flair")})
        for crf in crf_modes:
            tag = "crf" if crf else "nocrf"
            run = {}
            overrides = [*args.override, f"use_crf={str(crf).lower()}"]
            if labelled:
                seconds, _ = run_inference(ds_2015, tmp / f"pred2015_{tag}", configs, overrides)
                cases = {}
                for d in labelled:
                    ref_img = nib.load(d / "OTMultiClass.nii.gz")
                    ref = np.asarray(ref_img.dataobj).astype(np.int16)
                    pred = np.asarray(nib.load(tmp / f"pred2015_{tag}" / f"{d.name}.nii.gz").dataobj).astype(np.int16)
                    if pred.shape != ref.shape:
                        raise SystemExit(f"{d.name}: prediction shape {pred.shape} != label shape {ref.shape}")
                    spacing = [float(z) for z in ref_img.header.get_zooms()[:3]]
                    rp, rr = region_masks(pred, PRED_REGIONS), region_masks(ref, BRATS2015_REGIONS)
                    scores = region_metrics(np.stack([rp[r] for r in REGIONS]), np.stack([rr[r] for r in REGIONS]), spacing)
                    m = {}
                    for r in REGIONS:
                        m[f"dice_{r}"], m[f"hd95_{r}"] = scores[r]["dice"], scores[r]["hd95"]
                        vox_ml = float(np.prod(spacing)) / 1000.0
                        m[f"ml_{r}_pred"], m[f"ml_{r}_ref"] = float(rp[r].sum() * vox_ml), float(rr[r].sum() * vox_ml)
                    cases[d.name] = m
                    if crf == crf_modes[0]:
                        flair = np.asarray(nib.load(d / FILES_2015["flair"]).dataobj)
                        t1ce = np.asarray(nib.load(d / FILES_2015["t1ce"]).dataobj)
                        overlay_png(args.images_dir / f"{d.name}_{tag}.png", flair, t1ce, ref, pred, f"{d.name} ({args.label}, FLAIR + T1ce)")
                run["brats2015"] = {"cases": cases, "seconds_total": seconds, "n": len(labelled)}
            if unlabelled:
                vols = {}
                for name, ds in (("all four", ds_2023), ("FLAIR + T1ce", ds_2023_two)):
                    seconds, _ = run_inference(ds, tmp / f"pred2023_{tag}_{ds.name}", configs, overrides)
                    for d in unlabelled:
                        img = nib.load(tmp / f"pred2023_{tag}_{ds.name}" / f"{d.name}.nii.gz")
                        pred = np.asarray(img.dataobj).astype(np.int16)
                        vox_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
                        vols.setdefault(d.name, {})[name] = {r: float(m.sum() * vox_ml) for r, m in region_masks(pred, PRED_REGIONS).items()}
                        vols[d.name][name]["seconds_run"] = seconds
                        if crf == crf_modes[0]:
                            fl = np.asarray(nib.load(d / f"{d.name}-t2f.nii.gz").dataobj)
                            t1c = np.asarray(nib.load(d / f"{d.name}-t1c.nii.gz").dataobj)
                            overlay_png(args.images_dir / f"{d.name}_{tag}_{ds.name}.png", fl, t1c, None, pred, f"{d.name} ({args.label}, {name})")
                run["brats2023"] = vols
            results["runs"][tag] = run
    emit_tables(report(results, args.label), args.out, results)
    return 0


def report(results: dict, label: str) -> str:
    lines = [f"# {label} on real MRI", "", f"`{results['command']}`  ", f"{results['date']}, {results['machine']}  ",
             f"configs: {', '.join(results['configs'])}; overrides: {results['overrides'] or 'none'}", ""]
    for tag, run in results["runs"].items():
        crf = "with CRF" if tag == "crf" else "without CRF"
        if "brats2015" in run:
            b = run["brats2015"]
            lines += [f"## BraTS 2015 expert labels, FLAIR + T1ce only ({crf})", "",
                      "| case | Dice TC | Dice WT | Dice ET | mean | HD95 TC | HD95 WT | HD95 ET (mm) | WT mL pred / expert |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for name, m in b["cases"].items():
                mean = np.mean([m[f"dice_{r}"] for r in REGIONS])
                lines.append(f"| {name} | " + " | ".join(f"{m[f'dice_{r}']:.3f}" for r in REGIONS) + f" | {mean:.3f} | "
                             + " | ".join(f"{m[f'hd95_{r}']:.1f}" for r in REGIONS) + f" | {m['ml_WT_pred']:.0f} / {m['ml_WT_ref']:.0f} |")
            cs = list(b["cases"].values())
            means = {r: np.mean([c[f"dice_{r}"] for c in cs]) for r in REGIONS}
            hds = {r: np.mean([c[f"hd95_{r}"] for c in cs]) for r in REGIONS}
            lines.append("| **mean** | " + " | ".join(f"**{means[r]:.3f}**" for r in REGIONS) + f" | **{np.mean(list(means.values())):.3f}** | "
                         + " | ".join(f"{hds[r]:.1f}" for r in REGIONS) + " | |")
            lines += ["", f"{b['n']} cases in {b['seconds_total']:.1f} s (one bundle command: start-up, model build, and per case load, "
                          f"preprocess, network, post-processing, write)", ""]
        if "brats2023" in run:
            lines += [f"## BraTS 2023 case without label: predicted volumes ({crf})", "",
                      "| case | sequences | TC mL | WT mL | ET mL |", "|---|---|---|---|---|"]
            for name, per in run["brats2023"].items():
                for seqs, v in per.items():
                    lines.append(f"| {name} | {seqs} | {v['TC']:.1f} | {v['WT']:.1f} | {v['ET']:.1f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
