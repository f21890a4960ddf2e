"""The demo (``make demo``): the shipped model at work, then training a model of your own.

Every step runs the bundle's own commands (``python -m monai.bundle run ...``), exactly as the
README documents them:

1. writes the generated dataset if absent: ``data/synthetic`` (training, seed 0) and
   ``data/synthetic_heldout`` (held-out, seed 2; the shipped model was trained on seed 1), BraTS
   2021 layout on the 2.5 mm grid;
2. the shipped model (``bundle/models/model.pt``, no training): evaluates it on the held-out cases
   and segments one of them with all four sequences and with FLAIR + T1ce only (``inference.json``
   as shipped), rendering both predictions;
3. trains a model from scratch on the CPU (``quick.json``) with MLflow tracking into ``runs/demo``
   (a previous ``runs/demo`` is kept, renamed with its time stamp), evaluates it on the held-out
   cases and segments the same case;
4. prints both Dice tables and the paths of the MLflow store, the predicted NIfTI files and PNGs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from devtools import CONFIGS, REPO

TRAIN_CASES, HELDOUT_CASES = 40, 8


def _configs(*names: str) -> str:
    return "[" + ",".join(f"'{CONFIGS / n}'" for n in names) + "]"


def _bundle(step: str, args: list[str], log: Path) -> float:
    """Run ``python -m monai.bundle ARGS``, streaming to ``log``; return the wall time in s."""
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    print(f"[{step}] {' '.join(cmd)}\n[{step}] log: {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"[{step}] failed after {elapsed:.0f} s (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(tail))
    print(f"[{step}] done in {elapsed:.0f} s", flush=True)
    return elapsed


def make_data(train_dir: Path, heldout_dir: Path, train_cases: int, heldout_cases: int) -> None:
    from custom.synthetic import write_dataset

    for out, cases, seed in ((train_dir, train_cases, 0), (heldout_dir, heldout_cases, 2)):
        if out.is_dir() and any(out.iterdir()):
            print(f"[data] using the existing {out}")
            continue
        start = time.perf_counter()
        write_dataset(out, cases, seed=seed, layout="brats2021", size="small")
        print(f"[data] wrote {cases} synthetic cases to {out} in {time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data", help="folder for the synthetic datasets")
    parser.add_argument("--run_dir", type=Path, default=REPO / "runs" / "demo", help="bundle_root of the demo run")
    parser.add_argument("--train_cases", type=int, default=TRAIN_CASES)
    parser.add_argument("--heldout_cases", type=int, default=HELDOUT_CASES)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more overrides for training, e.g. --epochs 2")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    train_dir, heldout_dir = args.data / "synthetic", args.data / "synthetic_heldout"
    make_data(train_dir, heldout_dir, args.train_cases, args.heldout_cases)

    run = args.run_dir
    if run.exists():
        kept = run.with_name(f"{run.name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(run.stat().st_mtime))}")
        os.replace(run, kept)
        print(f"[train] the previous demo run is kept in {kept}")
    (run / "logs").mkdir(parents=True)
    common = ["--bundle_root", str(run)]

    times = {}
    from custom.data import list_cases

    case = list_cases(heldout_dir)[0]
    one, two = run / "one_case", run / "one_case_flair_t1ce"
    one.mkdir()
    (one / case.case_id).symlink_to(Path(case.images[0]).parent.resolve())
    (two / case.case_id).mkdir(parents=True)
    for path in case.images:
        if path.endswith(("_flair.nii.gz", "_t1ce.nii.gz")):
            (two / case.case_id / Path(path).name).symlink_to(Path(path).resolve())

    shipped = REPO / "bundle" / "models" / "model.pt"
    shipped_summary, shipped_pngs = None, []
    if shipped.is_file():
        shipped_eval = run / "shipped_model_heldout_eval"
        times["shipped evaluate"] = _bundle("shipped model: evaluate", [
            "run", "evaluating", "--config_file", _configs("train.json", "evaluate.json"), "--logging_file", str(CONFIGS / "logging.conf"),
            "--dataset_dir", str(heldout_dir), *common, "--ckpt_path", str(shipped), "--output_dir", str(shipped_eval),
        ], run / "logs" / "shipped_evaluate.log")
        shipped_summary = json.loads((shipped_eval / "summary.json").read_text())
        for folder, what in ((one, "all four sequences"), (two, "FLAIR + T1ce only")):
            out = run / f"shipped_predictions_{folder.name}"
            times[f"shipped inference ({what})"] = _bundle(f"shipped model: inference, {what}", [
                "run", "inference", "--config_file", str(CONFIGS / "inference.json"), "--logging_file", str(CONFIGS / "logging.conf"),
                "--dataset_dir", str(folder), "--output_dir", str(out),
            ], run / "logs" / f"shipped_inference_{folder.name}.log")
            png = run / f"{case.case_id}_shipped_{folder.name}.png"
            _render_prediction(case, out / f"{case.case_id}.nii.gz", png, f"shipped model, {what}")
            shipped_pngs.append(png)
    else:
        print(f"[shipped model] {shipped} is missing: run `make pretrain` (or git lfs/checkout) to get it; skipping")

    times["train"] = _bundle("train", [
        "run", "training", "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", _configs("train.json", "quick.json"),
        "--logging_file", str(CONFIGS / "logging.conf"), "--dataset_dir", str(train_dir), *common,
        "--tracking", "mlflow", "--experiment_name", "demo", "--run_name", "train", *args.extra,
    ], run / "logs" / "train.log")

    heldout_eval = run / "heldout_eval"
    times["evaluate"] = _bundle("evaluate", [
        "run", "evaluating", "--config_file", _configs("train.json", "quick.json", "evaluate.json"),
        "--logging_file", str(CONFIGS / "logging.conf"), "--dataset_dir", str(heldout_dir), *common,
        "--output_dir", str(heldout_eval), "--tracking", "mlflow", "--experiment_name", "demo", "--run_name", "heldout_evaluation",
    ], run / "logs" / "evaluate.log")

    predictions = run / "predictions"
    times["inference"] = _bundle("inference", [
        "run", "inference", "--config_file", _configs("inference.json", "quick.json"), "--logging_file", str(CONFIGS / "logging.conf"),
        "--dataset_dir", str(one), *common, "--output_dir", str(predictions),
    ], run / "logs" / "inference.log")
    pred_path = predictions / f"{case.case_id}.nii.gz"
    png = run / f"{case.case_id}_prediction.png"
    _render_prediction(case, pred_path, png, "model trained by this demo")

    summary = json.loads((heldout_eval / "summary.json").read_text())
    total = time.perf_counter() - t0
    if shipped_summary:
        print("\nshipped model (trained on generated data only, no training in this demo):\n" + _table(shipped_summary))
        print("overlays:         " + ", ".join(str(p) for p in shipped_pngs))
    print("\nmodel trained by this demo (quick.json, a few minutes on the CPU):\n" + _table(summary))
    print(f"\nwall time: {total / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")")
    db = run / "eval" / "mlruns.db"
    print(f"MLflow store:     {db}\n  look at it with: mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1")
    print(f"model:            {run / 'models' / 'model.pt'}")
    print(f"held-out metrics: {heldout_eval / 'metrics.csv'}")
    print(f"prediction:       {pred_path}\noverlay:          {png}")
    return 0


def _table(summary: dict) -> str:
    lines = [f"held-out synthetic cases: {summary['cases']}", f"{'region':<8}{'Dice mean':>10}{'± std':>8}{'median':>9}{'HD95 mm':>10}"]
    for region in ("TC", "WT", "ET", "mean"):
        d, h = summary[f"dice_{region}"], summary[f"hd95_{region}"]
        lines.append(f"{region:<8}{d['mean']:>10.3f}{d['std']:>8.3f}{d['median']:>9.3f}{h['mean']:>10.2f}")
    return "\n".join(lines)


def _render_prediction(case, pred_path: Path, png: Path, what: str) -> None:
    import nibabel as nib
    import numpy as np

    from custom.render import render_case

    images = [np.asarray(nib.load(p).dataobj) for p in case.images]
    pred = nib.load(pred_path)
    render_case(images, np.asarray(pred.dataobj), png, affine=pred.affine, convention="brats2021",
                title=f"{case.case_id}: predicted label over FLAIR ({what})")


if __name__ == "__main__":
    raise SystemExit(main())
