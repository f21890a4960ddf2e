"""Accuracy comparison: U-Net and the Swin-UNETR ablations, trained and evaluated the same way.

One command trains every variant with the bundle's own training config, evaluates each on the
same held-out cases with and without the CRF (the bundle's ``evaluate.json``) and times the
bundle's inference (``inference.json``), then prints one markdown table::

    python -m benchmarks.compare_models --quick --out benchmarks/results/compare_quick.md
    python -m benchmarks.compare_models --full --dataset_dir /data/BraTS2021 \
        [--heldout_dir /data/BraTS2021_test] --out compare_full.md

Variants (all through ``bundle/configs`` with command-line-style overrides, never a copy of the
pipeline): ``unet`` (``unet.json``), ``swin`` (``spatial_attention`` and ``squeeze_excitation``
false: MONAI's SwinUNETR), ``se`` (+squeeze-and-excitation), ``att`` (+attention gates), ``both``
(the bundle's default network).

Same for every variant: training data and fold split, seed (``set_determinism``), pipeline,
optimiser and schedule, number of epochs and so of iterations (printed), validation interval and
model selection (best validation mean Dice), held-out cases.

* ``--quick`` (default): ``train.json`` + ``quick.json`` (CPU settings of the demo: 2.5 mm grid,
  64^3 crops, ``feature_size`` 12, depths 1), the embedded synthetic dataset (``data/synthetic``,
  40 cases; ``data/synthetic_heldout``, 8 cases; written if absent, as ``make demo`` does),
  ``--epochs 8`` (8 x 32 = 256 iterations per variant). About an hour on the 2-core CPU machine.
* ``--pretrain``: the shipped model's recipe (``train.json`` + ``pretrain.json``: 2 mm grid,
  64^3 crops, ``feature_size`` 12) on the generated pool ``make pretrain`` trains on
  (``data/pretrain``: 400 cases of ``custom.synthetic`` seed 1, size medium; written if absent),
  held-out: 16 generated cases of seed 2 (``runs/compare/heldout_seed2_medium_16``), ``--epochs 1``
  unless given. With ``--real_dev ../shared/real-dev`` every variant is also scored on real MRI
  by ``benchmarks.real_mri`` (the bundle's ``inference.json``; the expert-labelled FLAIR + T1ce
  cases), with and without the CRF::

      python -m benchmarks.compare_models --pretrain --real_dev ../shared/real-dev --no_timing \
          --override iterations_per_epoch=300 --out benchmarks/results/compare_pretrain.md

* ``--full``: ``train.json`` as shipped (1 mm, 128^3 crops, ``feature_size`` 48, 300 epochs), on
  ``--dataset_dir`` (e.g. real BraTS 2021); held-out cases from ``--heldout_dir``, or, without it,
  the validation fold of ``--fold`` (then model selection and the figures use the same cases:
  say so when you report them).

Each step runs in its own Python process (``monai.bundle.ConfigWorkflow`` on the bundle configs),
so that peak memory is per step: the maximum resident set size of the process (``ru_maxrss``)
and, on CUDA, ``torch.cuda.max_memory_allocated``. Measured:

* training seconds per iteration: trainer ITERATION_STARTED -> ITERATION_COMPLETED (forward,
  backward, optimiser step; data loading and validation excluded), median over iterations;
  training wall time (incl. caching, validation, checkpoints) is printed too;
* Dice TC/WT/ET/mean and HD95 (mm): the bundle's evaluation (``evaluate.json``:
  ``custom.metrics.BraTSMetricsWriter``, label maps scored in each case's original grid), mean
  and std over held-out cases;
* inference seconds per case: the bundle's inference (load, preprocess, sliding window,
  post-process incl. the CRF when on, write NIfTI), evaluator GET_BATCH_STARTED ->
  ITERATION_COMPLETED, ``num_workers`` 0, median over cases (the first case is a warm-up and is
  not counted unless it is the only one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.step_runner import CONFIGS, REPO, cuda_available, emit_tables, peak_memory, run_step, run_training_timed, serve_step
from custom.data import REGIONS

TRAINING_ONLY = ("iterations_per_epoch", "num_samples", "warmup_epochs", "learning_rate", "num_folds", "ckpt_dir", "output_dir")
VARIANTS = {
    # name: (label, extra config files, overrides)
    "unet": ("U-Net (unet.json)", ["unet.json"], {}),
    "swin": ("Swin-UNETR (plain)", [], {"spatial_attention": False, "squeeze_excitation": False}),
    "se": ("Swin-UNETR + SE", [], {"spatial_attention": False, "squeeze_excitation": True}),
    "att": ("Swin-UNETR + attention", [], {"spatial_attention": True, "squeeze_excitation": False}),
    "both": ("Swin-UNETR + attention + SE", [], {"spatial_attention": True, "squeeze_excitation": True}),
}


# ---------------------------------------------------------------------------------------------
# worker: one bundle step in this process
# ---------------------------------------------------------------------------------------------
def _workflow(config_files: list[str], workflow_type: str | None, overrides: dict):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=config_files, meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=str(CONFIGS / "logging.conf"), workflow_type=workflow_type)
    for k, v in overrides.items():
        wf.parser[k] = v
    wf.initialize()
    return wf


def worker_train(spec: dict) -> dict:
    import torch

    wf = _workflow(spec["configs"], "train", spec["overrides"])
    p = wf.parser
    trainer = p.get_parsed_content("train#trainer")
    net = p.get_parsed_content("network")
    wall, times = run_training_timed(wf, trainer)
    validator = p.get_parsed_content("validate#evaluator")
    best = getattr(validator.state, "best_metric", None)
    return {
        "parameters": int(sum(q.numel() for q in net.parameters())),
        "iterations": int(trainer.state.iteration),
        "epochs": int(trainer.state.epoch),
        "s_per_iteration": statistics.median(times) if times else float("nan"),
        "s_per_iteration_mean": statistics.fmean(times) if times else float("nan"),
        "train_wall_s": wall,
        "best_val_mean_dice": float(best) if best is not None and best > -1 else None,
        "threads": torch.get_num_threads(),
        **peak_memory(),
    }


def worker_evaluate(spec: dict) -> dict:
    out = {}
    for use_crf in (False, True):
        d = Path(spec["output_dir"]) / ("crf" if use_crf else "no_crf")
        t0 = time.perf_counter()
        wf = _workflow(spec["configs"], None, {**spec["overrides"], "use_crf": use_crf, "output_dir": str(d)})
        wf.run()
        wf.finalize()
        summary = json.loads((d / "summary.json").read_text())
        out["crf" if use_crf else "no_crf"] = {"summary": summary, "wall_s": time.perf_counter() - t0}
    return out


def worker_infer(spec: dict) -> dict:
    from ignite.engine import Events

    wf = _workflow(spec["configs"], "infer", spec["overrides"])
    evaluator = wf.parser.get_parsed_content("evaluator")
    times: list[float] = []
    t = {}
    evaluator.add_event_handler(Events.GET_BATCH_STARTED, lambda e: t.__setitem__("t0", time.perf_counter()))
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: times.append(time.perf_counter() - t["t0"]))
    wf.run()
    wf.finalize()
    counted = times[1:] if len(times) > 1 else times
    return {"cases": len(times), "s_per_case": statistics.median(counted) if counted else float("nan"),
            "per_case_s": times, **peak_memory()}


WORKERS = {"train": worker_train, "evaluate": worker_evaluate, "infer": worker_infer}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _fmt_gb(r: dict) -> str:
    s = f"{r['peak_rss_gb']:.2f}"
    if "peak_cuda_gb" in r:
        s += f" (CUDA {r['peak_cuda_gb']:.2f})"
    return s


def real_dev_summary(real: dict) -> dict:
    """``{"no_crf"|"crf": {"TC", "WT", "ET", "mean", "hd95_mean"}}``: means over the expert-labelled
    cases of a ``benchmarks.real_mri`` result (its ``.json``)."""
    out = {}
    for tag, run in real["runs"].items():
        cases = list(run["brats2015"]["cases"].values())
        m = {r: statistics.fmean(c[f"dice_{r}"] for c in cases) for r in REGIONS}
        m["mean"] = statistics.fmean(m[r] for r in REGIONS)
        m["hd95_mean"] = statistics.fmean(statistics.fmean(c[f"hd95_{r}"] for r in REGIONS) for c in cases)
        out["crf" if tag == "crf" else "no_crf"] = m
    return out


def make_tables(results: dict, settings: dict) -> str:
    lines = [
        f"Synthetic-data results unless `--dataset_dir` says otherwise. Held-out cases: {settings['heldout_desc']}; "
        f"{settings['iterations_desc']}.",
        "",
        "| model | CRF | Dice TC | Dice WT | Dice ET | Dice mean | HD95 mean (mm) | parameters | train s/it | infer s/case | peak RSS train / infer (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        label = VARIANTS[name][0]
        for crf in ("no_crf", "crf"):
            if crf not in r.get("evaluate", {}):
                continue
            s = r["evaluate"][crf]["summary"]
            dice = [f"{s[f'dice_{k}']['mean']:.3f} ± {s[f'dice_{k}']['std']:.3f}" for k in (*REGIONS, "mean")]
            hd = f"{s['hd95_mean']['mean']:.2f} ± {s['hd95_mean']['std']:.2f}"
            inf = r.get(f"infer_{crf}", {})
            tr = r["train"]
            lines.append(
                f"| {label} | {'yes' if crf == 'crf' else 'no'} | " + " | ".join(dice) + f" | {hd} | {tr['parameters']:,} | "
                f"{tr['s_per_iteration']:.2f} | {format(inf['s_per_case'], '.2f') if inf else '-'} | "
                f"{_fmt_gb(tr)} / {_fmt_gb(inf) if inf else '-'} |")
    lines += ["", "| model | iterations (epochs) | training wall s | best validation mean Dice | HD95 TC / WT / ET (mm), no CRF | with CRF |",
              "|---|---|---|---|---|---|"]
    for name, r in results.items():
        tr = r["train"]
        hds = []
        for crf in ("no_crf", "crf"):
            s = r["evaluate"][crf]["summary"]
            hds.append(" / ".join(f"{s[f'hd95_{k}']['mean']:.2f}" for k in REGIONS))
        bv = f"{tr['best_val_mean_dice']:.3f}" if tr.get("best_val_mean_dice") is not None else "-"
        lines.append(f"| {VARIANTS[name][0]} | {tr['iterations']} ({tr['epochs']}) | {tr['train_wall_s']:.0f} | {bv} | {hds[0]} | {hds[1]} |")
    real = {name: real_dev_summary(r["real_dev"]) for name, r in results.items() if "real_dev" in r}
    if real:
        any_real = next(r["real_dev"] for r in results.values() if "real_dev" in r)
        n = next(iter(any_real["runs"].values()))["brats2015"]["n"]
        lines += ["", f"Real MRI ({settings['real_dev']}): {n} expert-labelled BraTS 2015 cases, FLAIR + T1ce only, the bundle's "
                  f"inference.json (threshold and CRF settings as shipped unless overridden), means over the cases.", "",
                  "| model | CRF | real Dice TC | real Dice WT | real Dice ET | real Dice mean | real HD95 mean (mm) | generated held-out Dice mean |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, per in real.items():
            for crf in ("no_crf", "crf"):
                if crf not in per:
                    continue
                m = per[crf]
                gen = results[name]["evaluate"][crf]["summary"]["dice_mean"]["mean"]
                lines.append(f"| {VARIANTS[name][0]} | {'yes' if crf == 'crf' else 'no'} | "
                             + " | ".join(f"{m[k]:.3f}" for k in (*REGIONS, "mean")) + f" | {m['hd95_mean']:.1f} | {gen:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if serve_step(argv, WORKERS):  # internal: one step in a fresh process
        return 0

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU settings (quick.json, synthetic data); the default")
    mode.add_argument("--pretrain", action="store_true", help="the shipped model's recipe (pretrain.json) on the generated pool")
    mode.add_argument("--full", action="store_true", help="the shipped train.json settings (GPU, real BraTS via --dataset_dir)")
    ap.add_argument("--dataset_dir", type=Path, help="training cases (default --quick: data/synthetic, written if absent)")
    ap.add_argument("--heldout_dir", type=Path, help="held-out labelled cases (default --quick: data/synthetic_heldout; "
                    "--full without it: the validation fold)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--epochs", type=int, help="training epochs for every variant (default: --quick 8, --full the config's 300)")
    ap.add_argument("--val_interval", type=int, help="validation interval in epochs (default: the config's)")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work_dir", type=Path, default=REPO / "runs" / "compare", help="one bundle_root per variant under it")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the steps (default: torch's)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                    help="more config overrides for every step, e.g. --override num_workers=4")
    ap.add_argument("--skip_training", action="store_true", help="reuse the models already in --work_dir")
    ap.add_argument("--resume", action="store_true", help="keep every variant already finished in --work_dir and every "
                    "model already trained there; do the rest (the same command again continues an interrupted run)")
    ap.add_argument("--no_timing", action="store_true", help="skip the inference timing runs (accuracy only)")
    ap.add_argument("--real_dev", type=Path, help="also score every variant on real MRI (benchmarks.real_mri on this folder)")
    ap.add_argument("--out", type=Path, help="also write the tables (markdown) to this file")
    args = ap.parse_args(argv)
    full = args.full

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")

    if full:
        if args.dataset_dir is None:
            ap.error("--full needs --dataset_dir (e.g. a BraTS 2021 training folder)")
        train_dir, heldout_dir = args.dataset_dir, args.heldout_dir
        base = ["train.json"]
        epochs = args.epochs
    elif args.pretrain:
        from custom.synthetic import write_dataset

        train_dir = args.dataset_dir or REPO / "data" / "pretrain"
        heldout_dir = args.heldout_dir or args.work_dir / "heldout_seed2_medium_16"
        for d, n, seed in ((train_dir, 400, 1), (heldout_dir, 16, 2)):  # as `make pretrain` and benchmarks.threshold
            if not (d / ".complete").is_file() and not (d == train_dir and args.dataset_dir):
                print(f"# writing {n} generated cases (seed {seed}, medium) to {d}", flush=True)
                write_dataset(d, n, seed=seed, layout="brats2021", size="medium", workers=2)
                (d / ".complete").touch()
        base = ["train.json", "pretrain.json"]
        epochs = args.epochs or 1
    else:
        from tools.demo import HELDOUT_CASES, TRAIN_CASES, make_data

        train_dir = args.dataset_dir or REPO / "data" / "synthetic"
        heldout_dir = args.heldout_dir or (None if args.dataset_dir else REPO / "data" / "synthetic_heldout")
        if args.dataset_dir is None:
            make_data(train_dir, heldout_dir, TRAIN_CASES, HELDOUT_CASES)
        base = ["train.json", "quick.json"]
        epochs = args.epochs or 8

    common = {"dataset_dir": str(train_dir.resolve()), "seed": args.seed, "fold": args.fold}
    if epochs:
        common["epochs"] = epochs
    if args.val_interval:
        common["val_interval"] = args.val_interval
    elif epochs:  # at least one validation, hence a best model, also for short runs
        from monai.bundle import ConfigParser

        cfg = ConfigParser()
        cfg.read_config([str(CONFIGS / c) for c in base])
        if epochs < int(cfg["val_interval"]):
            common["val_interval"] = epochs
    for o in args.override:
        k, _, v = o.partition("=")
        common[k] = json.loads(v)
    eval_over = {"dataset_dir": str(heldout_dir.resolve())} if heldout_dir else {"eval_datalist": "$@val_datalist"}
    heldout_desc = (f"{heldout_dir} (all labelled cases)" if heldout_dir
                    else f"the validation fold {args.fold} of {train_dir} (ALSO used for model selection)")

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    mode_name = "full" if full else "pretrain" if args.pretrain else "quick"
    print(f"# compare_models: {mode_name} settings, configs {base} (+unet.json for U-Net); "
          f"training data {train_dir}; held-out {heldout_desc}; seed {args.seed}, fold {args.fold}; "
          f"overrides {json.dumps(common)}; load average {tuple(round(x, 2) for x in load_before)}", flush=True)
    results: dict = {}
    work = args.work_dir.resolve()
    for name in variants:
        label, extra, net_over = VARIANTS[name]
        root = work / name
        log = root / "benchmark.log"
        cfgs = [str(CONFIGS / c) for c in (*base, *extra)]
        r: dict = {}
        t0 = time.perf_counter()
        over = {**common, **net_over, "bundle_root": str(root)}
        if args.pretrain:  # pretrain.json writes under runs/pretrain: keep each variant in its own root
            over.update(ckpt_dir=str(root / "models"), output_dir=str(root / "eval"))
        if args.resume and (root / "variant_result.json").is_file():
            results[name] = json.loads((root / "variant_result.json").read_text())
            print(f"[{name}] finished before: kept ({root / 'variant_result.json'})", flush=True)
            continue
        if args.skip_training or (args.resume and (root / "train_result.json").is_file()):
            r["train"] = json.loads((root / "train_result.json").read_text())
        else:
            print(f"[{name}] training {label} -> {root} (log {log})", flush=True)
            r["train"] = run_step(__file__, "train", {"configs": cfgs, "overrides": over}, log, args.threads)
            (root / "train_result.json").write_text(json.dumps(r["train"], indent=1))
            tr = r["train"]
            print(f"[{name}] {tr['iterations']} iterations ({tr['epochs']} epochs) in {tr['train_wall_s']:.0f} s, "
                  f"{tr['s_per_iteration']:.2f} s/iteration, {tr['parameters']:,} parameters, load {os.getloadavg()[0]:.2f}", flush=True)
        ckpt = str(root / "models" / "model.pt")
        if not Path(ckpt).is_file():
            raise SystemExit(f"[{name}] training wrote no best model ({ckpt}): no validation ran (epochs < val_interval?)")
        print(f"[{name}] evaluating on the held-out cases, without and with the CRF", flush=True)
        r["evaluate"] = run_step(__file__, "evaluate", {
            "configs": cfgs + [str(CONFIGS / "evaluate.json")],
            "overrides": {**over, **eval_over, "ckpt_path": ckpt}, "output_dir": str(root / "heldout_eval")}, log, args.threads)
        infer_cfgs = [str(CONFIGS / "inference.json")] + [c for c in cfgs if Path(c).name not in ("train.json", "pretrain.json")]
        infer_over = {k: v for k, v in over.items() if k not in ("seed", "fold", "epochs", "val_interval", "dataset_dir", *TRAINING_ONLY)}
        if args.real_dev:
            from benchmarks import real_mri

            print(f"[{name}] scoring on real MRI ({args.real_dev}), without and with the CRF", flush=True)
            real_out = root / "real_mri.md"
            real_mri.main(["--real_dev", str(args.real_dev), "--out", str(real_out), "--images_dir", str(root / "real_mri_images"),
                           "--label", label, "--crf", "both", *(f"--config={c}" for c in infer_cfgs[1:]),
                           *(f"--override={k}={v!r}" for k, v in {**infer_over, "ckpt_path": ckpt}.items())])  # Python literals, as fire reads them
            r["real_dev"] = json.loads(real_out.with_suffix(".json").read_text())
        for crf in (() if args.no_timing else ("no_crf", "crf")):
            print(f"[{name}] timing inference ({'with' if crf == 'crf' else 'without'} CRF)", flush=True)
            r[f"infer_{crf}"] = run_step(__file__, "infer", {"configs": infer_cfgs, "overrides": {
                **infer_over, "dataset_dir": str((heldout_dir or train_dir).resolve()), "ckpt_path": ckpt,
                "output_dir": str(root / f"predictions_{crf}"), "use_crf": crf == "crf", "num_workers": 0}}, log, args.threads)
        r["wall_s"] = time.perf_counter() - t0
        results[name] = r
        (root / "variant_result.json").write_text(json.dumps(r, indent=1))
        s = {c: r["evaluate"][c]["summary"]["dice_mean"]["mean"] for c in ("no_crf", "crf")}
        print(f"[{name}] done in {r['wall_s']:.0f} s: held-out mean Dice {s['no_crf']:.3f} (CRF {s['crf']:.3f})", flush=True)
        (work / "results.json").write_text(json.dumps(results, indent=1))

    total = time.perf_counter() - t_start
    load_after = os.getloadavg()
    its = sorted({r["train"]["iterations"] for r in results.values()})
    settings = {"heldout_desc": heldout_desc, "real_dev": args.real_dev,
                "iterations_desc": f"{'/'.join(map(str, its))} training iterations per variant, seed {args.seed}"}
    header = [
        f"## Model comparison ({mode_name} settings)",
        "",
        f"Command: `python -m benchmarks.compare_models {' '.join(argv)}`  ",
        f"Configs: {', '.join(base)} (+ unet.json for U-Net), overrides {json.dumps(common)}; "
        f"training data {train_dir}.  ",
        f"Wall time {total / 60:.1f} min in all (" + ", ".join(f"{k} {v['wall_s'] / 60:.1f}" for k, v in results.items())
        + f" min); load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
        f"{tuple(round(x, 2) for x in load_after)}; {os.cpu_count()} CPUs; "
        f"{'CUDA' if cuda_available() else 'CPU'}; {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
    ]
    text = "\n".join(header) + "\n" + make_tables(results, settings) + "\n"
    emit_tables(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
