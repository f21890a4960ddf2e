"""Fine-tuning the shipped model on 5 generated cases: held-out Dice before and after (issue 15).

    python -m benchmarks.fine_tune --out benchmarks/results/fine_tune.md     # 10-15 min on 2 CPU cores
    python -m benchmarks.fine_tune --smoke --out /tmp/fine_tune_smoke.md      # end to end, tiny (a few minutes)

Data (``custom.synthetic``, the current generator, BraTS 2021 layout, ``--size medium``: 2 mm, the
shipped model's grid): ``--train_cases`` (5) cases of seed 15 to fine-tune on and
``--heldout_cases`` (8) of seed 16 to score on, seeds used nowhere else (the shipped model was
trained on 400 cases of seed 1 of the same generator).

Every step is a ``monai.bundle.ConfigWorkflow`` on the bundle's own configs in a fresh process
(``benchmarks/step_runner.py``); only config overrides are set here, nothing of the pipeline is
copied:

1. the shipped weights (``--weights``, default ``bundle/models/model.pt``) scored on the held-out
   cases with the bundle's evaluation (``train.json`` + ``evaluate.json``, no CRF, as in the model card);
2. fine-tuned from them: ``train.json`` + ``fine_tune.json`` (the recipe the MONAI Label train task
   adds when it starts from the served weights: ``epochs`` x ``iterations_per_epoch`` of one 64^3
   crop, a low ``learning_rate`` decayed by the cosine schedule, no warm-up), a
   ``custom.handlers.checkpoints.CheckedCheckpointLoader`` of the weights prepended to
   ``train#handlers`` (as the task does); ``--epochs``, ``--iterations_per_epoch`` and
   ``--learning_rate`` override the recipe; all training cases, validated once on them at the end
   (the saved model is the final one: no model selection), then scored as in 1.;
3. the same with ``iterations_per_epoch`` null (one pass over the training cases an epoch, the
   epoch of ``train.json`` as shipped) and the same number of epochs: what a small dataset gets when
   the training length is counted in passes.

Table: Dice TC / WT / ET / mean and HD95 (mean over regions) as means over the held-out cases (the
BraTS rules for empty masks, each case's own grid), the change of the mean Dice against the shipped
weights, iterations (epochs x per epoch), the training step's minutes (start-up, caching, iterations,
the final validation) and seconds per iteration (median of ITERATION_STARTED -> COMPLETED); then
the mean Dice of every held-out case. A ``.json`` with everything is written beside ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from benchmarks.step_runner import CONFIGS, REPO, peak_memory, run_step, run_training_timed, serve_step
from custom.data import REGIONS

TRAIN_SEED, HELDOUT_SEED = 15, 16
TRAIN_CONFIGS = ["train.json", "fine_tune.json"]
EVAL_CONFIGS = ["train.json", "evaluate.json"]


# ---------------------------------------------------------------------------------------------
# workers: one bundle step in this process
# ---------------------------------------------------------------------------------------------
def _workflow(configs: list[str], workflow_type: str | None, overrides: dict, weights: str | None = None):
    """The bundle's ``configs`` with ``overrides``; ``weights``: a checkpoint loader of them first in
    ``train#handlers`` (the MONAI Label train task's ``pretrained``)."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[str(CONFIGS / c) for c in configs], meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=str(CONFIGS / "logging.conf"), workflow_type=workflow_type)
    for k, v in overrides.items():
        wf.parser[k] = v
    if weights:
        loader = {"_target_": "custom.handlers.checkpoints.CheckedCheckpointLoader", "load_path": weights, "load_dict": {"model": "@network"},
                  "network_settings": "@network_settings", "map_location": "@device", "strict": True}
        wf.parser["train#handlers"] = [loader, *copy.deepcopy(wf.parser.get("train#handlers"))]
    wf.initialize()
    return wf


def worker_train(spec: dict) -> dict:
    import torch

    wf = _workflow(TRAIN_CONFIGS, "train", spec["overrides"], spec["weights"])
    trainer = wf.parser.get_parsed_content("train#trainer")
    wall, times = run_training_timed(wf, trainer)
    validator = wf.parser.get_parsed_content("validate#evaluator")
    return {"iterations": int(trainer.state.iteration), "epochs": int(trainer.state.epoch), "epoch_length": int(trainer.state.epoch_length),
            "run_wall_s": wall, "s_per_iteration": statistics.median(times) if times else float("nan"),
            "training_cases_val_dice": float(validator.state.best_metric), "threads": torch.get_num_threads(), **peak_memory()}


def worker_evaluate(spec: dict) -> dict:
    out = Path(spec["overrides"]["output_dir"])
    wf = _workflow(EVAL_CONFIGS, None, spec["overrides"])
    t0 = time.perf_counter()
    wf.run()
    wall = time.perf_counter() - t0
    wf.finalize()
    with open(out / "metrics.csv") as f:
        cases = {row["case_id"]: float(row["dice_mean"]) for row in csv.DictReader(f)}
    return {"summary": json.loads((out / "summary.json").read_text()), "case_dice_mean": cases, "run_wall_s": wall}


WORKERS = {"train": worker_train, "evaluate": worker_evaluate}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def make_data(folder: Path, cases: int, seed: int, size: str, workers: int) -> Path:
    """``cases`` generated cases of ``seed`` in ``folder`` (kept when already complete)."""
    from custom.data import list_cases
    from custom.synthetic import write_dataset

    if folder.is_dir() and len([c for c in list_cases(folder) if c.label is not None]) == cases:
        print(f"[data] using the existing {folder}", flush=True)
        return folder
    t0 = time.perf_counter()
    write_dataset(folder, cases, seed=seed, layout="brats2021", size=size, workers=workers)
    print(f"[data] wrote {cases} cases (seed {seed}, {size}) to {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def _shown(path: str) -> str:
    """``path`` relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def report(results: dict) -> str:
    a = results["settings"]
    rows = results["rows"]
    base = rows["shipped"]["evaluate"]["summary"]["dice_mean"]["mean"]
    lines = [
        f"## Fine-tuning the shipped model on {a['train_cases']} generated cases",
        "",
        f"Command: `{results['command']}`  ",
        f"{results['date']}, {results['machine']}; wall time {results['wall_s'] / 60:.1f} min  ",
        f"Weights: `{_shown(a['weights'])}` (sha256 {results['weights_sha256'][:12]}). Data: {a['train_cases']} training cases (seed "
        f"{a['train_seed']}) and {a['heldout_cases']} held-out cases (seed {a['heldout_seed']}), `custom.synthetic --size {a['size']} "
        f"--layout brats2021`.  ",
        f"Fine-tuning: {' + '.join(TRAIN_CONFIGS)}, overrides {json.dumps(results['train_overrides'])}, iterations_per_epoch as in "
        f"the rows; the shipped weights loaded first (`custom.handlers.checkpoints.CheckedCheckpointLoader` in `train#handlers`).  ",
        f"Scoring: {' + '.join(EVAL_CONFIGS)} (no CRF) on the held-out cases.",
        "",
        "| model | iterations (epochs x per epoch) | training min | s/iteration | Dice TC | Dice WT | Dice ET | Dice mean | change "
        "| HD95 mean (mm) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        s = r["evaluate"]["summary"]
        tr = r.get("train")
        its = f"{tr['iterations']} ({tr['epochs']} x {tr['epoch_length']})" if tr else "0"
        minutes = f"{tr['process_wall_s'] / 60:.1f}" if tr else "-"
        per_it = f"{tr['s_per_iteration']:.2f}" if tr else "-"
        change = f"{s['dice_mean']['mean'] - base:+.3f}" if tr else "-"
        dice = " | ".join(f"{s[f'dice_{k}']['mean']:.3f}" for k in (*REGIONS, "mean"))
        lines.append(f"| {r['label']} | {its} | {minutes} | {per_it} | {dice} | {change} | {s['hd95_mean']['mean']:.1f} |")
    names = list(rows)
    lines += ["", "Mean Dice per held-out case:", "", "| case | " + " | ".join(rows[n]["label"] for n in names) + " |",
              "|---|" + "---|" * len(names)]
    for case in rows["shipped"]["evaluate"]["case_dice_mean"]:
        lines.append(f"| {case} | " + " | ".join(f"{rows[n]['evaluate']['case_dice_mean'][case]:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if serve_step(argv, WORKERS):  # internal: one step in a fresh process
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="markdown file for the tables (printed anyway); a .json beside it")
    ap.add_argument("--work_dir", type=Path, help="data and one bundle_root per run (default runs/fine_tune, --smoke runs/fine_tune_smoke)")
    ap.add_argument("--weights", type=Path, default=REPO / "bundle" / "models" / "model.pt",
                    help="the weights to fine-tune (the shipped network's settings)")
    ap.add_argument("--train_cases", type=int, default=5)
    ap.add_argument("--heldout_cases", type=int, default=8)
    ap.add_argument("--size", choices=("medium", "small", "full"), default="medium", help="generated case size (medium: 2 mm)")
    ap.add_argument("--train_seed", type=int, default=TRAIN_SEED)
    ap.add_argument("--heldout_seed", type=int, default=HELDOUT_SEED)
    ap.add_argument("--epochs", type=int, help="epochs (default: fine_tune.json's)")
    ap.add_argument("--iterations_per_epoch", type=int, help="iterations an epoch of the fine-tuning row (default: fine_tune.json's)")
    ap.add_argument("--learning_rate", type=float, help="peak learning rate (default: fine_tune.json's)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (set_determinism)")
    ap.add_argument("--no_one_pass", action="store_true", help="skip the one-pass-per-epoch comparison row")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=JSON", help="more overrides for both trainings")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the steps (default: torch's)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes generating the cases")
    ap.add_argument("--smoke", action="store_true", help="tiny end-to-end run: 2 small training cases, 1 held-out, 1 epoch x 2 iterations")
    args = ap.parse_args(argv)
    if args.smoke:
        args.train_cases, args.heldout_cases, args.size, args.epochs, args.iterations_per_epoch = 2, 1, "small", 1, 2
    if not args.weights.is_file():
        ap.error(f"{args.weights}: no weights (the shipped model is bundle/models/model.pt)")
    work = (args.work_dir or REPO / "runs" / ("fine_tune_smoke" if args.smoke else "fine_tune")).resolve()
    weights = str(args.weights.resolve())

    t_start = time.perf_counter()
    command = "python -m benchmarks.fine_tune " + shlex.join(sys.argv[1:] if argv is None else argv)
    results: dict = {"command": command, "date": dt.datetime.now().isoformat(timespec="seconds"),
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start",
                     "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "weights_sha256": hashlib.sha256(args.weights.read_bytes()).hexdigest(), "rows": {}}
    data = work / "data"
    train_dir = make_data(data / f"train_seed{args.train_seed}_{args.size}_{args.train_cases}", args.train_cases, args.train_seed,
                          args.size, args.workers)
    heldout_dir = make_data(data / f"heldout_seed{args.heldout_seed}_{args.size}_{args.heldout_cases}", args.heldout_cases,
                            args.heldout_seed, args.size, args.workers)
    log = work / "benchmark.log"

    def evaluate(name: str, ckpt: str) -> dict:
        print(f"[{name}] scoring {ckpt} on the held-out cases", flush=True)
        overrides = {"dataset_dir": str(heldout_dir), "ckpt_path": ckpt, "bundle_root": str(work / name),
                     "output_dir": str(work / name / "heldout_eval"), "num_workers": 0}
        r = run_step(__file__, "evaluate", {"overrides": overrides}, log, args.threads)
        print(f"[{name}] held-out mean Dice {r['summary']['dice_mean']['mean']:.3f}", flush=True)
        return r

    results["rows"]["shipped"] = {"label": "shipped, not fine-tuned", "evaluate": evaluate("shipped", weights)}
    from monai.bundle import ConfigParser

    recipe = ConfigParser.load_config_files([str(CONFIGS / c) for c in TRAIN_CONFIGS])
    args.epochs = args.epochs or recipe["epochs"]
    args.iterations_per_epoch = args.iterations_per_epoch or recipe["iterations_per_epoch"]
    train_overrides = {"epochs": args.epochs, "val_interval": args.epochs, "seed": args.seed, "num_workers": 0,
                       **({"learning_rate": args.learning_rate} if args.learning_rate else {}),
                       "train_datalist": "$@datalist['training']", "val_datalist": "$@datalist['training']"}
    for o in args.override:
        k, _, v = o.partition("=")
        train_overrides[k] = json.loads(v)
    results["train_overrides"] = train_overrides
    runs = {"fine_tuned": (args.iterations_per_epoch, f"fine-tuned, {args.iterations_per_epoch} iterations an epoch")}
    if not args.no_one_pass:
        runs["one_pass"] = (None, "fine-tuned, one pass an epoch (iterations_per_epoch null)")
    for name, (per_epoch, label) in runs.items():
        root = work / name
        length = f"{per_epoch} iterations" if per_epoch else "one pass over the training cases"
        print(f"[{name}] fine-tuning: {args.epochs} epochs of {length} -> {root} (log {log})", flush=True)
        tr = run_step(__file__, "train", {"weights": weights, "overrides": {**train_overrides, "dataset_dir": str(train_dir),
                                                                              "bundle_root": str(root), "iterations_per_epoch": per_epoch}},
                      log, args.threads)
        print(f"[{name}] {tr['iterations']} iterations in {tr['process_wall_s'] / 60:.1f} min, "
              f"{tr['s_per_iteration']:.2f} s/iteration", flush=True)
        ckpt = root / "models" / "model.pt"
        if not ckpt.is_file():
            raise SystemExit(f"[{name}] the training wrote no model ({ckpt}): see {log}")
        results["rows"][name] = {"label": label, "train": tr, "evaluate": evaluate(name, str(ckpt))}
    results["wall_s"] = time.perf_counter() - t_start
    text = report(results)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"# tables written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
