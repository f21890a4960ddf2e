"""Benchmark the dense CRF post-processing step (``custom.transforms.crf.DenseCRFd``) inside the bundle's inference.

``bench``: runs the bundle's own inference workflow (``bundle/configs/inference.json``, or
``<bundle_root>/configs/inference.json``, plus optional override configs such as
``bundle/configs/quick.json``) through ``monai.bundle.ConfigWorkflow`` twice on the same cases, with
``use_crf`` false and true, and prints per case the wall time of the CRF step (``DenseCRFd.last_info``)
and of the whole inference of the case (loading, preprocessing, network, post-processing, saving:
from the evaluator's GET_BATCH_STARTED to ITERATION_COMPLETED, ``num_workers=0``), and the Dice per
region of the label maps the bundle saved, against the ground truth::

    python -m benchmarks.crf_benchmark bench --data /tmp/crf_bench --cases 3 --seed 1 --size full \
        [--bundle_root TRAINED_BUNDLE] [--config bundle/configs/quick.json] [--threads 1]

With ``--bundle_root`` holding ``models/model.pt`` the trained network's probabilities are refined.
Without one, the probabilities are ORACLE-NOISED (:func:`oracle_noised_probs`: ground-truth regions
on the network grid as signed-distance logits, with smooth and voxel noise and false-positive
specks); the untrained network is still run on every case (output discarded, unless
``--skip_network``) so that the end-to-end time contains a real network forward pass, and the
oracle's own time is subtracted. Such rows are labelled ``oracle``. The CRF is the config's own
``DenseCRFd`` entry (between ``Activationsd`` and ``Invertd``), switched by ``use_crf``. An unmeasured warm-up run on the first case comes first.

``tune``: coordinate descent over the CRF parameters on oracle-noised probabilities of a training
split (synthetic seed 0), on the bundle preprocessing's grid; how the defaults of ``DenseCRFd``
were chosen::

    python -m benchmarks.crf_benchmark tune --data /tmp/crf_train --cases 4 --seed 0 --size full
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from custom.data import REGIONS, list_cases, load_nifti, load_voxels  # noqa: E402
from custom.metrics import region_dice, spacing_of  # noqa: E402
from custom.synthetic import write_dataset  # noqa: E402
from custom.transforms import LabelToRegions  # noqa: E402
from custom.transforms.crf import DenseCRFd, dense_crf_regions  # noqa: E402
from devtools import REPO

CONFIGS = REPO / "bundle" / "configs"

"""The post-processing entry recommended for ``inference.json`` (between Activationsd and Invertd)."""


# ---------------------------------------------------------------------------------------------
# oracle-noised probabilities
# ---------------------------------------------------------------------------------------------
def oracle_noised_probs(regions: np.ndarray, brain: np.ndarray, spacing, seed: int) -> np.ndarray:
    """Imitation network output from ground truth: ``(3, H, W, D)`` region probabilities.

    ``regions``: ``(3, H, W, D)`` ground-truth masks (TC, WT, ET); ``brain``: ``(H, W, D)`` bool;
    ``spacing``: mm per axis. Each region's logit is 1.5 x its signed distance to the mask
    boundary in mm (positive inside), clipped to [-15, 8] (confident far from the tumour);
    a smooth random field (sigma 4 mm, std 2.5 logits: boundaries shifted by about 1.7 mm, some
    missed and extra tumour next to it) and voxel noise (std 0.8 logits) are added; 6 false-positive specks
    (balls of radius 1.5-3 mm, probability about 0.9, random nested region pattern) are put in
    brain tissue at least 25 mm from the tumour. Fixed before the CRF defaults were tuned.
    """
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, float)
    shape = regions.shape[1:]
    logits = np.full(regions.shape, -15.0, np.float32)
    for c in range(regions.shape[0]):
        mask = regions[c] > 0
        if mask.any():
            signed = ndi.distance_transform_edt(mask, sampling=sp) - ndi.distance_transform_edt(~mask, sampling=sp)
            logits[c] = np.clip(1.5 * signed, -15.0, 8.0)
        field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4.0 / sp)
        field *= 2.5 / max(float(field.std()), 1e-6)
        logits[c] += field + 0.8 * rng.standard_normal(shape).astype(np.float32)
    wt = regions[REGIONS.index("WT")] > 0
    far = brain & (ndi.distance_transform_edt(~wt, sampling=sp) >= 25.0) if wt.any() else brain
    cand = np.argwhere(far)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float32) if cand.size else None
    for _ in range(6 if cand.size else 0):
        centre = cand[rng.integers(len(cand))]
        radius = rng.uniform(1.5, 3.0)
        lo = np.maximum(centre - np.ceil(radius / sp).astype(int), 0)
        hi = np.minimum(centre + np.ceil(radius / sp).astype(int) + 1, shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        ball = (((grid[sl] - centre) * sp) ** 2).sum(-1) <= radius**2
        level = rng.integers(1, 4)  # 1: WT only, 2: WT + TC, 3: WT + TC + ET
        for r, on in (("WT", level >= 1), ("TC", level >= 2), ("ET", level >= 3)):
            if on:
                logits[REGIONS.index(r)][sl][ball] = np.float32(np.log(9.0)) + 0.5 * rng.standard_normal(int(ball.sum())).astype(np.float32)
    return 1.0 / (1.0 + np.exp(-logits))


def case_seed(case_id: str) -> int:
    """A stable per-case seed for the oracle noise (the same in both benchmark runs)."""
    return zlib.crc32(case_id.encode())


def ensure_dataset(data: Path, cases: int, seed: int, size: str) -> None:
    if not data.exists() or not any(data.iterdir()):
        print(f"# generating {cases} synthetic cases (seed {seed}, {size}) in {data}", flush=True)
        write_dataset(data, cases, seed=seed, layout="brats2021", size=size)


def read_configs(config_files: list[str]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files)
    return parser


# ---------------------------------------------------------------------------------------------
# tune
# ---------------------------------------------------------------------------------------------
def preprocessed_cases(data: Path, config_files: list[str]):
    """(case_id, image (4,H,W,D), regions (3,H,W,D), affine) through the bundle's own preprocessing."""
    parser = read_configs(config_files)
    parser["dataset_dir"] = str(data)
    pre = parser.get_parsed_content("preprocessing")
    cases = list_cases(data)
    to_regions = LabelToRegions(cases[0].layout.convention)
    for c in cases:
        d = pre(c.to_dict())
        yield c.case_id, d["image"].numpy().astype(np.float32), to_regions(d["label"]).numpy() > 0.5, d["image"].affine.numpy()


def tune(args) -> None:
    data = Path(args.data)
    ensure_dataset(data, args.cases, args.seed, args.size)
    cases = []
    for cid, image, regions, affine in preprocessed_cases(data, [str(CONFIGS / "inference.json"), *args.config]):
        sp = spacing_of(affine)
        probs = oracle_noised_probs(regions, np.any(image != 0, 0), sp, case_seed(cid))
        cases.append((cid, image, regions, affine[:3, :3], probs))
        print(f"# {cid}: grid {image.shape[1:]}, spacing {sp}, baseline Dice {region_dice(probs, regions)}", flush=True)
    base = {k: v for k, v in DenseCRFd("pred").params.items() if k != "crop"}
    if args.start:
        base.update(json.loads(args.start))
    # Priors, not tuned: on these synthetic cases Dice keeps creeping up with ever wider and stronger
    # appearance kernels (the oracle's voxel noise averages away and the synthetic tissue classes are
    # unusually uniform), which would not transfer to real images. So the spatial widths are capped at
    # 10 mm (the margin stays 20 mm = 2 widths, keeping cropped and full runs alike and the cost
    # local), and w_bilateral at 10: the unary is -log(max(p, 1e-5)) <= 11.5, so with w <= 10 the
    # appearance term alone cannot overturn a voxel the network is more than ~99.995 % sure of,
    # while w = 20 or more turns the CRF into an intensity segmentation seeded by the network.
    grid = {
        "theta_intensity": [0.25, 0.5, 1.0],
        "theta_bilateral_mm": [3.0, 5.0, 10.0],
        "w_bilateral": [2.0, 5.0, 10.0],
        "theta_gauss_mm": [1.5, 3.0],
        "w_gauss": [0.0, 1.0, 3.0],
        "n_iter": [5, 10],
        "box_threshold": [0.3, 0.5],
    }

    def score(params) -> tuple[float, float]:
        dices, secs = [], 0.0
        for _, image, regions, lin, probs in cases:
            out, info = dense_crf_regions(probs, image, lin, **params, crop=True)
            dices.append(np.mean(list(region_dice(out, regions).values())))
            secs += info["seconds"]
        return float(np.mean(dices)), secs / len(cases)

    baseline = float(np.mean([np.mean(list(region_dice(probs, regions).values())) for _, _, regions, _, probs in cases]))
    print(f"# no CRF: mean Dice {baseline:.4f}")
    best = dict(base)
    best_score, secs = score(best)
    print(f"start {best} -> {best_score:.4f} ({secs:.2f} s/case)", flush=True)
    for rnd in range(args.rounds):  # coordinate descent, one parameter at a time
        changed = False
        for name, values in grid.items():
            for v in values:
                if v == best[name]:
                    continue
                trial = {**best, name: v}
                s, secs = score(trial)
                print(f"round {rnd} {name}={v}: {s:.4f} ({secs:.2f} s/case)", flush=True)
                if s > best_score + 1e-3:  # smaller gains are noise: keep the earlier (cheaper) value
                    best, best_score, changed = trial, s, True
            print(f"# best after {name}: {best} -> {best_score:.4f}", flush=True)
        if not changed:
            break
    print(json.dumps({"no_crf_mean_dice": baseline, "best_mean_dice": best_score, "best": best}, indent=1))


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------
class OracleInferer:
    """Stands in for the bundle's inferer when there is no trained model: runs the real inferer
    (untrained network, for timing) unless ``run_network`` is False, then returns the logits of
    :func:`oracle_noised_probs` of the batch's preprocessed label. ``spent`` = seconds of oracle work."""

    def __init__(self, inferer, run_network: bool, to_regions: LabelToRegions) -> None:
        self.inferer, self.run_network, self.to_regions = inferer, run_network, to_regions
        self.label = None
        self.case_id = ""
        self.spent = 0.0
        self.network_seconds = 0.0

    def __call__(self, inputs, network, *args, **kwargs):
        from monai.utils import convert_to_dst_type

        t0 = time.perf_counter()
        out = self.inferer(inputs, network, *args, **kwargs) if self.run_network else None
        t1 = time.perf_counter()
        self.network_seconds = t1 - t0
        image = inputs[0].detach().cpu()
        regions = self.to_regions(self.label[0].cpu()).numpy() > 0.5
        probs = oracle_noised_probs(regions, np.any(image.numpy() != 0, 0), spacing_of(image.affine.numpy()), case_seed(self.case_id))
        probs = np.clip(probs.astype(np.float64), 1e-7, 1.0 - 1e-7)  # float32 sigmoids can round to exactly 1
        logits = torch.from_numpy(np.log(probs / (1.0 - probs)).astype(np.float32))[None]
        result, *_ = convert_to_dst_type(logits, out if out is not None else inputs, dtype=torch.float32)
        self.spent = time.perf_counter() - t1
        return result


def run_bundle(config_files, data: Path, out_dir: Path, use_crf: bool, bundle_root: Path | None, run_network: bool, overrides: dict,
               first_only: bool = False) -> dict:
    """Run the bundle's inference workflow once over ``data`` (``first_only``: its first case, as a
    warm-up); per-case timings; the label maps are saved in ``out_dir`` by the bundle's SaveImaged."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    oracle = bundle_root is None
    wf = ConfigWorkflow(config_file=[str(c) for c in config_files], meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=str(CONFIGS / "logging.conf"), workflow_type="infer")
    p = wf.parser
    if "crf" not in p:
        raise RuntimeError("the inference config has no `crf` step")
    settings = {"dataset_dir": str(data), "output_dir": str(out_dir), "use_crf": use_crf, "num_workers": 0, **overrides}
    if bundle_root is not None:
        settings["bundle_root"] = str(bundle_root)
    else:  # no checkpoint to load; the datalist carries the label for the oracle
        settings["checkpoint_loader#_disabled_"] = True
    if oracle or first_only:  # labelled entries (the inference datalist leaves labels out), or the first case
        datalist = [c.to_dict() for c in list_cases(data)]
        settings["datalist"] = datalist[:1] if first_only else datalist
    for k, v in settings.items():
        p[k] = v
    wf.initialize()
    evaluator = p.get_parsed_content("evaluator")
    crf = p.get_parsed_content("crf")
    if use_crf != (crf is not None):
        raise RuntimeError(f"use_crf={use_crf} but the parsed post-processing {'lacks' if crf is None else 'has'} DenseCRFd")
    if oracle:
        cases = list_cases(data)
        evaluator.inferer = OracleInferer(evaluator.inferer, run_network, LabelToRegions(cases[0].layout.convention))
    rows: dict[str, dict] = {}
    state: dict = {}

    def started(engine):
        state["t0"] = time.perf_counter()

    def iteration_started(engine):
        fname = engine.state.batch["image"].meta["filename_or_obj"][0]
        from custom.data import case_id_from_path

        state["case"] = case_id_from_path(fname)
        if oracle:
            evaluator.inferer.label = engine.state.batch["label"]
            evaluator.inferer.case_id = state["case"]

    def completed(engine):
        total = time.perf_counter() - state["t0"]
        row = {"total": total, "crf": 0.0, "crf_voxels": 0, "network": None, "oracle": 0.0}
        if crf is not None:
            info = crf.last_info.get("pred", {})
            row["crf"], row["crf_voxels"] = info.get("seconds", 0.0), info.get("voxels", 0)
        if oracle:
            row["oracle"] = evaluator.inferer.spent
            row["network"] = evaluator.inferer.network_seconds if run_network else None
            row["total"] = total - evaluator.inferer.spent
        rows[state["case"]] = row

    evaluator.add_event_handler(Events.GET_BATCH_STARTED, started)
    evaluator.add_event_handler(Events.ITERATION_STARTED, iteration_started)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, completed)
    wf.run()
    wf.finalize()
    return rows


def bench(args) -> None:
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    ensure_dataset(data, args.cases, args.seed, args.size)
    bundle_root = Path(args.bundle_root) if args.bundle_root else None
    if bundle_root is not None and not (bundle_root / "models" / "model.pt").is_file():
        sys.exit(f"error: {bundle_root}/models/model.pt does not exist (train the bundle first, or omit --bundle_root for oracle-noised probabilities)")
    base_cfg = (bundle_root / "configs" / "inference.json" if bundle_root is not None and (bundle_root / "configs" / "inference.json").is_file()
                else CONFIGS / "inference.json")
    config_files = [base_cfg, *[Path(c) for c in args.config]]
    overrides = json.loads(args.overrides) if args.overrides else {}
    out_root = Path(args.out or tempfile.mkdtemp(prefix="crf_bench_"))
    if not args.no_warmup:  # first-run costs (imports, allocator, file cache) would otherwise land on the no-CRF run
        run_bundle(config_files, data, out_root / "warmup", True, bundle_root, not args.skip_network, overrides, first_only=True)
    load_before = os.getloadavg()
    runs = {}
    for use_crf in (False, True):
        runs[use_crf] = run_bundle(config_files, data, out_root / ("crf" if use_crf else "no_crf"), use_crf, bundle_root,
                                   not args.skip_network, overrides)
    load_after = os.getloadavg()
    cases = list_cases(data)
    to_regions = LabelToRegions(cases[0].layout.convention)
    source = "trained model" if bundle_root is not None else ("ORACLE-NOISED probabilities (untrained network run for timing only)"
                                                             if not args.skip_network else "ORACLE-NOISED probabilities (network NOT run)")
    print(f"\n# configs: {', '.join(str(c) for c in config_files)}; overrides {overrides or '{}'}; torch threads {args.threads}")
    print(f"# probabilities: {source}")
    print(f"# load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}; "
          f"{os.cpu_count()} CPUs")
    head = (f"{'case':<18} {'src':<7} {'net s':>6} {'e2e s':>7} {'e2e+CRF s':>9} {'CRF s':>6} {'CRF %':>6} {'CRF vox':>8}  "
            + "  ".join(f"{r + ' Dice':>9} {r + '+CRF':>8} {'d' + r:>7}" for r in REGIONS))
    print(head)
    print("-" * len(head))
    deltas, fracs = [], []
    for c in cases:
        gt = to_regions(torch.as_tensor(np.asarray(load_voxels(load_nifti(c.label), c.label)))[None]).numpy() > 0.5
        dice = {}
        for use_crf in (False, True):
            pred_path = out_root / ("crf" if use_crf else "no_crf") / f"{c.case_id}.nii.gz"
            pred = np.asarray(load_voxels(load_nifti(pred_path), str(pred_path)))
            dice[use_crf] = region_dice(to_regions(torch.as_tensor(pred)[None]).numpy() > 0.5, gt)
        r0, r1 = runs[False][c.case_id], runs[True][c.case_id]
        frac = 100.0 * r1["crf"] / r1["total"]
        fracs.append(frac)
        deltas.append([dice[True][r] - dice[False][r] for r in REGIONS])
        net = f"{r1['network']:.1f}" if r1["network"] is not None else "-"
        print(f"{c.case_id:<18} {'trained' if bundle_root else 'oracle':<7} {net:>6} {r0['total']:>7.1f} {r1['total']:>9.1f} {r1['crf']:>6.2f} "
              f"{frac:>5.1f}% {r1['crf_voxels']:>8d}  "
              + "  ".join(f"{dice[False][r]:>9.4f} {dice[True][r]:>8.4f} {dice[True][r] - dice[False][r]:>+7.4f}" for r in REGIONS))
    d = np.mean(deltas, axis=0)
    print("# mean Dice change with CRF: " + ", ".join(f"{r} {x:+.4f}" for r, x in zip(REGIONS, d))
          + f"; CRF share of end-to-end time: max {max(fracs):.1f}% (target <= 15%)")
    print("# e2e = the whole bundle inference of one case (load, preprocess, network, post-process, save)"
          + ("; the oracle's own time is subtracted" if bundle_root is None else "") + f"; predictions in {out_root}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("bench", "tune"):
        s = sub.add_parser(name)
        s.add_argument("--data", required=True, help="BraTS-layout dataset folder; generated if missing or empty")
        s.add_argument("--cases", type=int, default=3, help="cases to generate (default 3)")
        s.add_argument("--seed", type=int, default=1 if name == "bench" else 0,
                       help="synthetic seed (bench default 1; tune default 0: the training split)")
        s.add_argument("--size", choices=("full", "small"), default="full")
        s.add_argument("--config", action="append", default=[], help="extra override config(s) after inference.json, e.g. bundle/configs/quick.json")
    b = sub.choices["bench"]
    b.add_argument("--bundle_root", help="trained bundle folder with models/model.pt; omitted: oracle-noised probabilities")
    b.add_argument("--skip_network", action="store_true", help="oracle mode: do not run the untrained network")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    b.add_argument("--overrides", help="JSON dict of extra config overrides, e.g. '{\"sw_batch_size\": 1}'")
    b.add_argument("--out", help="output folder for the predictions (default: a new temporary folder)")
    b.add_argument("--no_warmup", action="store_true", help="skip the unmeasured warm-up run on the first case")
    t = sub.choices["tune"]
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--start", help="JSON dict of starting parameters (default: DenseCRFd's defaults)")
    args = ap.parse_args(argv)
    bench(args) if args.cmd == "bench" else tune(args)


if __name__ == "__main__":
    main()
