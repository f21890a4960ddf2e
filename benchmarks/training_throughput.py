"""Training throughput: our network against MONAI's stock SwinUNETR, and the data loader's share of a step.

Runs the bundle's own training workflow (``train.json`` [+ ``quick.json``], ``monai.bundle.ConfigWorkflow``:
the real ``CacheDataset``, random crops and augmentation, ``DataLoader``, ``DiceCELoss``, AdamW,
``SupervisedTrainer`` with its post-processing and metric) for a fixed number of iterations with
``network_def`` overridden per variant, each in its own process:

* ``monai-swinunetr``: MONAI's stock ``SwinUNETR`` with the config's settings (width, depths, heads,
  ``use_flash_attention=True`` as in ``train.json``): the like-for-like reference;
  ``monai-swinunetr-default``: the same with MONAI's default ``use_flash_attention=False`` (optional);
* ``ours``: the config's network (attention gates + squeeze-and-excitation); ``ours-se``,
  ``ours-att``: one addition each (optional);
* ``no-op``: the network replaced by a 1x1x1 convolution (4 -> 3 channels, 15 parameters), so
  a step is data loading + loss + engine overhead only: the data loader's own throughput.

Per iteration (ignite events of the trainer): data wait = GET_BATCH_STARTED -> GET_BATCH_COMPLETED
(with ``num_workers`` 0 the loading and augmentation themselves, else the time the step waited for
the workers), compute = ITERATION_STARTED -> ITERATION_COMPLETED (forward, loss, backward,
optimiser step, post-processing), step = both. Medians over the iterations after ``--warmup``.
Samples/s = batch_size x num_samples / step. Rounds alternate the variants (stock, ours, stock,
ours, ...) so that a change of machine load hits both; the table gives every round and the median.
The attention+SE overhead is ours / stock - 1 of the median step; the loader's share is its data
wait over the step, and no-op samples/s against ours shows how far the loader is from being the
bottleneck::

    python -m benchmarks.training_throughput --quick --out benchmarks/results/training_throughput.md
    python -m benchmarks.training_throughput --full --iterations 4 --cases 4      # 128^3, width 48 (slow on CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.step_runner import CONFIGS, REPO, emit_tables, load_average, peak_memory, run_step, serve_step

VARIANTS = {
    "monai-swinunetr": ("MONAI SwinUNETR (stock)", {
        "network_def": {"_target_": "SwinUNETR", "in_channels": 4, "out_channels": 3, "feature_size": "@feature_size",
                        "depths": "@depths", "num_heads": "@num_heads", "use_checkpoint": False, "use_flash_attention": True}}),
    "monai-swinunetr-default": ("MONAI SwinUNETR (stock, MONAI's default use_flash_attention=False)", {
        "network_def": {"_target_": "SwinUNETR", "in_channels": 4, "out_channels": 3, "feature_size": "@feature_size",
                        "depths": "@depths", "num_heads": "@num_heads", "use_checkpoint": False}}),
    "ours": ("ours (attention + SE, the config's network)", {}),
    "ours-se": ("ours, SE only", {"spatial_attention": False, "squeeze_excitation": True}),
    "ours-att": ("ours, attention gates only", {"spatial_attention": True, "squeeze_excitation": False}),
    "no-op": ("no-op network (1x1x1 conv, 4->3)", {
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 4, "out_channels": 3, "kernel_size": 1}}),
}


def worker(spec: dict) -> dict:
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=spec["configs"], meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=str(CONFIGS / "logging.conf"), workflow_type="train")
    p = wf.parser
    n = spec["warmup"] + spec["iterations"]
    settings = {"dataset_dir": spec["dataset_dir"], "bundle_root": spec["bundle_root"], "epochs": 1, "val_interval": 10**6,
                "train#trainer#epoch_length": n, "seed": 0, **spec["overrides"]}
    if spec.get("cases"):
        settings["train_datalist"] = f"$datalist.select_fold(@datalist, @fold, validation=False)[:{int(spec['cases'])}]"
        settings["val_datalist"] = "$datalist.select_fold(@datalist, @fold, validation=True)[:1]"
    for k, v in settings.items():
        p[k] = v
    t0 = time.perf_counter()
    wf.initialize()
    trainer = p.get_parsed_content("train#trainer")
    net = p.get_parsed_content("network")
    setup = time.perf_counter() - t0
    ev: dict = {"data": [], "compute": []}
    t: dict = {}
    trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda e: t.__setitem__("b", time.perf_counter()))
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, lambda e: ev["data"].append(time.perf_counter() - t["b"]))
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: t.__setitem__("i", time.perf_counter()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: ev["compute"].append(time.perf_counter() - t["i"]))
    wf.run()
    wf.finalize()
    w = spec["warmup"]
    data, compute = ev["data"][w:], ev["compute"][w:]
    steps = [a + b for a, b in zip(data, compute)]
    samples = int(p["batch_size"]) * int(p["num_samples"])
    step = statistics.median(steps)
    return {
        "iterations": len(steps), "samples_per_step": samples, "step_s": step, "data_s": statistics.median(data),
        "compute_s": statistics.median(compute), "samples_per_s": samples / step, "data_share": statistics.median(data) / step,
        "steps_s": steps, "parameters": int(sum(q.numel() for q in net.parameters())), "setup_s": setup,
        "num_workers": int(p["num_workers"]), "roi_size": list(p["roi_size"]), "feature_size": int(p["feature_size"]),
        "threads": torch.get_num_threads(), **peak_memory(),
    }


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if serve_step(argv, {"train": worker}):
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="train.json + quick.json (width 12, 64^3, the CPU settings); the default")
    mode.add_argument("--full", action="store_true", help="train.json as shipped (width 48, 128^3, 2 crops per case)")
    ap.add_argument("--dataset_dir", type=Path, default=REPO / "data" / "synthetic", help="training data (default data/synthetic)")
    ap.add_argument("--variants", default="monai-swinunetr,ours,no-op", help=f"comma-separated, from {','.join(VARIANTS)}")
    ap.add_argument("--iterations", type=int, help="timed iterations per run (default --quick 20, --full 4)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over the variants (default 2)")
    ap.add_argument("--cases", type=int, help="use only the first N training cases (less caching time; default all)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the workers (default: torch's)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=JSON", help="more config overrides, e.g. num_workers=2")
    ap.add_argument("--work_dir", type=Path, default=REPO / "runs" / "training_throughput")
    ap.add_argument("--smoke", action="store_true", help="tiny run for tests (2 iterations, 2 cases, stock and ours, one round)")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.iterations, args.warmup, args.rounds, args.cases = 2, 1, 1, 2
        args.variants = "monai-swinunetr,no-op"
    full = args.full
    configs = [str(CONFIGS / "train.json")] + ([] if full else [str(CONFIGS / "quick.json")])
    iterations = args.iterations or (4 if full else 20)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v}")
    extra = {}
    for o in args.override:
        k, _, v = o.partition("=")
        extra[k] = json.loads(v)
    work = args.work_dir.resolve()
    log = work / "workers.log"
    load_start = load_average()
    t_all = time.perf_counter()
    print(f"# training_throughput: {configs}; data {args.dataset_dir}; {iterations} timed iterations after {args.warmup}; "
          f"{args.rounds} rounds; load {load_start}", flush=True)
    runs: dict = {v: [] for v in variants}
    for rnd in range(args.rounds):
        for v in variants:
            spec = {"configs": configs, "overrides": {**VARIANTS[v][1], **extra}, "dataset_dir": str(args.dataset_dir.resolve()),
                    "bundle_root": str(work / v), "iterations": iterations, "warmup": args.warmup, "cases": args.cases}
            r = run_step(__file__, "train", spec, log, args.threads)
            r["load"] = load_average()
            runs[v].append(r)
            print(f"[round {rnd + 1}] {v}: {r['samples_per_s']:.3f} samples/s (step {r['step_s']:.3f} s = data {r['data_s']:.3f} + "
                  f"compute {r['compute_s']:.3f}); load {r['load']}", flush=True)
    text = report(argv, configs, args, iterations, runs, load_start, time.perf_counter() - t_all)
    emit_tables(text, args.out)
    return 0


def report(argv, configs, args, iterations, runs, load_start, wall) -> str:
    first = next(iter(runs.values()))[0]
    L = ["## Training throughput", "",
         f"Command: `python -m benchmarks.training_throughput {' '.join(argv)}`  ",
         f"Configs {', '.join(Path(c).name for c in configs)}: width {first['feature_size']}, crops {first['roi_size']}, "
         f"{first['samples_per_step']} sample(s) per step, num_workers {first['num_workers']}; data {args.dataset_dir}"
         f"{f' (first {args.cases} training cases)' if args.cases else ''}; {iterations} timed iterations after {args.warmup} warm-up, "
         f"medians; torch {first['threads']} threads, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}; total {wall / 60:.1f} min; "
         f"load average (1/5/15 min) at the start {load_start}.", "",
         "| variant | round | parameters | samples/s | step s | data wait s | compute s | loader share of the step | peak RSS GB | load after |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    med = {}
    for v, rs in runs.items():
        for i, r in enumerate(rs):
            L.append(f"| {VARIANTS[v][0]} | {i + 1} | {r['parameters']:,} | {r['samples_per_s']:.3f} | {r['step_s']:.3f} | {r['data_s']:.3f} | "
                     f"{r['compute_s']:.3f} | {100 * r['data_share']:.1f} % | {r['peak_rss_gb']:.1f} | {r['load']} |")
        med[v] = {k: statistics.median(r[k] for r in rs) for k in ("samples_per_s", "step_s", "data_s", "compute_s", "data_share")}
    L += ["", "| variant | median samples/s | median step s | median compute s | median data wait s | loader share |", "|---|---|---|---|---|---|"]
    for v, m in med.items():
        L.append(f"| {VARIANTS[v][0]} | {m['samples_per_s']:.3f} | {m['step_s']:.3f} | {m['compute_s']:.3f} | {m['data_s']:.3f} | "
                 f"{100 * m['data_share']:.1f} % |")
    L.append("")
    if "monai-swinunetr" in med:
        s = med["monai-swinunetr"]
        for v in ("ours", "ours-se", "ours-att"):
            if v in med:
                L.append(f"- {VARIANTS[v][0]}: step {100 * (med[v]['step_s'] / s['step_s'] - 1):+.1f} % against stock SwinUNETR "
                         f"(compute only {100 * (med[v]['compute_s'] / s['compute_s'] - 1):+.1f} %); per round: "
                         + ", ".join(f"{100 * (a['step_s'] / b['step_s'] - 1):+.1f} %" for a, b in zip(runs[v], runs["monai-swinunetr"])) + ".")
    if "no-op" in med and "ours" in med:
        L.append(f"- Data loader alone (no-op network): {med['no-op']['samples_per_s']:.2f} samples/s, "
                 f"{med['no-op']['samples_per_s'] / med['ours']['samples_per_s']:.1f}x what our network trains at; "
                 f"the loader's share of our step: {100 * med['ours']['data_share']:.1f} %.")
    L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    raise SystemExit(main())
