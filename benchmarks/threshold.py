"""The decision threshold of the network's sigmoid outputs (the bundle's ``threshold`` id), chosen on
generated held-out cases.

    python -m benchmarks.threshold --out benchmarks/results/threshold.md     # about 5 min on 2 CPU cores

Writes ``--cases`` (16) generated cases of seed ``--seed`` (2; the shipped model was trained on
seed 1) at the shipped model's grid (``--size medium``: 2 mm), BraTS 2021 layout, into
``--work_dir``, then runs the bundle's evaluation (``train.json`` + ``evaluate.json``, weights
``--ckpt_path``, no CRF) once per value of ``--thresholds``, each as
``python -m monai.bundle run evaluating ... --threshold T``, and tabulates each run's
``summary.json``: Dice TC / WT / ET / mean and HD95 mean over regions (mm), means over the cases
(BraTS rules for empty masks, each case's own grid).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.step_runner import CONFIGS, REPO, emit_tables, load_average
from custom.data import REGIONS


def evaluate(dataset: Path, ckpt: Path, threshold: float, out: Path, log: Path) -> dict:
    """``summary.json`` of the bundle's evaluation of ``dataset`` at ``threshold``."""
    configs = "[" + ",".join(f"'{CONFIGS / c}'" for c in ("train.json", "evaluate.json")) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--meta_file", str(CONFIGS / "metadata.json"),
           "--logging_file", str(CONFIGS / "logging.conf"), "--config_file", configs, "--dataset_dir", str(dataset),
           "--ckpt_path", str(ckpt), "--output_dir", str(out), "--threshold", str(threshold), "--use_crf", "false"]
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"evaluation at threshold {threshold} failed (exit {rc}); see {log}")
    return json.loads((out / "summary.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="markdown file for the table (printed anyway)")
    ap.add_argument("--work_dir", type=Path, default=REPO / "runs" / "threshold", help="generated cases and evaluation outputs")
    ap.add_argument("--ckpt_path", type=Path, default=REPO / "bundle" / "models" / "model.pt")
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--size", choices=("small", "medium", "full"), default="medium")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.4, 0.3])
    args = ap.parse_args(argv)
    from custom.synthetic import write_dataset

    t0 = time.perf_counter()
    data = args.work_dir / f"heldout_seed{args.seed}_{args.size}_{args.cases}"
    if not (data / ".complete").is_file():
        write_dataset(data, args.cases, seed=args.seed, layout="brats2021", size=args.size, workers=2)
        (data / ".complete").touch()
    log = args.work_dir / "evaluate.log"
    rows = []
    for t in args.thresholds:
        s = evaluate(data, args.ckpt_path, t, args.work_dir / f"eval_{args.size}_{t:g}", log)
        rows.append((t, s))
        print(f"[threshold {t:g}] mean Dice {s['dice_mean']['mean']:.3f}", flush=True)
    command = "python -m benchmarks.threshold " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Decision threshold on generated held-out cases", "",
        f"`{command}`  ",
        f"{dt.datetime.now().isoformat(timespec='seconds')}, {platform.machine()}, load average {load_average()}; "
        f"{(time.perf_counter() - t0) / 60:.1f} min  ",
        f"Weights `{args.ckpt_path.resolve().relative_to(REPO) if args.ckpt_path.resolve().is_relative_to(REPO) else args.ckpt_path}`; "
        f"{args.cases} cases of `custom.synthetic` seed {args.seed}, size {args.size}; train.json + evaluate.json, no CRF.", "",
        "| threshold | Dice TC | Dice WT | Dice ET | Dice mean | HD95 mean (mm) |", "|---|---|---|---|---|---|",
    ]
    for t, s in rows:
        dice = " | ".join(f"{s[f'dice_{k}']['mean']:.3f}" for k in (*REGIONS, "mean"))
        lines.append(f"| {t:g} | {dice} | {s['hd95_mean']['mean']:.1f} |")
    emit_tables("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
