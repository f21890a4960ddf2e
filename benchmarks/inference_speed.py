"""Inference speed on a full-size case: our bundle against MONAI's stock SwinUNETR and SegResNet pipelines.

One run measures, side by side, end-to-end seconds per case (load, preprocess, sliding window,
post-process, write the label NIfTI) and peak memory of:

* ``monai-swinunetr``: MONAI's stock ``SwinUNETR`` at the bundle's width (``feature_size``, depths
  and heads of the config; MONAI's default ``use_flash_attention=False``) in the stock BraTS
  pipeline of MONAI's own reference script (``Project-MONAI/research-contributions``,
  ``SwinUNETR/BRATS21/test.py``): load the four modalities, z-score over non-zero voxels, the whole
  240x240x155 volume through ``sliding_window_inference`` (roi = the config's ``roi_size``,
  ``sw_batch_size=1``, ``overlap=0.6``, constant blending) under ``torch.no_grad``, sigmoid, 0.5
  threshold, BraTS labels, ``nib.save``. This is the reference of every ratio.
* ``monai-swinunetr, bundle pipeline``: the same stock network inside OUR bundle pipeline
  (``inference.json`` with only ``network_def``/``network`` overridden): like-with-like, it
  isolates what the network changes do from what the pipeline (foreground crop, overlap) does.
* ``monai-segresnet``: MONAI's ``SegResNet`` in the configuration of MONAI's BraTS bundle
  (``blocks_down [1,2,2,4]``, ``blocks_up [1,1,1]``, ``init_filters 16``, in 4, out 3, dropout 0.2;
  roi 240x240x160, ``sw_batch_size=1``, ``overlap=0.5``), same stock pipeline as above.
* ``ours``: the bundle's own inference (``inference.json`` as shipped, ``monai.bundle.ConfigWorkflow``),
  without and with the CRF; and ``ours, before`` (the network not passed through
  ``custom.networks.fast_inference.accelerate``, i.e. the config before the speed work).

Networks have random weights (no trained full-width model exists), so that the CRF does realistic
work the bundle rows feed it ORACLE-NOISED probabilities (``benchmarks/crf_benchmark.py``:
ground truth + noise + false-positive specks), computed before the timed pass; the network
still runs on every window and its time is in the total. Every pipeline runs in its own process
after one unmeasured network forward on a roi-sized window (warm-up); peak memory = the largest
resident set size sampled every 20 ms during the timed case (``psutil``; on CUDA also
``torch.cuda.max_memory_allocated``).

Further tables: network-level options on one roi window (fused attention, ``accelerate``,
``torch.inference_mode``, channels-last, bfloat16 autocast, windows per forward), the number of
sliding windows per overlap, time against the number of voxels (the bundle pipeline at three
resampling spacings), model FLOPs per case (``torch.utils.flop_counter`` on one window x windows)
against the machine's measured peak matmul FLOP/s, and output agreement of the fast path with the
reference on a trained model (``runs/demo``, ``quick.json``) when there is one::

    python -m benchmarks.inference_speed --out benchmarks/results/inference_speed.md      # full width (48)
    python -m benchmarks.inference_speed --config bundle/configs/quick.json --size small   # quick width (12)
    python -m benchmarks.inference_speed --smoke                                           # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from benchmarks.step_runner import CONFIGS, REPO, cuda_available, emit_tables, load_average, run_step, serve_step

STOCK_SWIN = {"overlap": 0.6, "sw_batch_size": 1, "mode": "constant"}  # research-contributions BRATS21/test.py
SEGRESNET = {"roi": [240, 240, 160], "overlap": 0.5, "sw_batch_size": 1, "mode": "constant"}  # MONAI brats_mri_segmentation
SEGRESNET_ARGS = {"blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "init_filters": 16, "in_channels": 4, "out_channels": 3,
                  "dropout_prob": 0.2}


# ---------------------------------------------------------------------------------------------
# measuring helpers (used in the worker processes)
# ---------------------------------------------------------------------------------------------
class PeakMemory:
    """Largest RSS of this process sampled every ``interval`` s between ``start()`` and ``stop()``."""

    def __init__(self, device: str = "cpu", interval: float = 0.02) -> None:
        import psutil

        self.proc, self.interval, self.device = psutil.Process(), interval, device
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def start(self) -> PeakMemory:
        import torch

        self.peak = self.proc.memory_info().rss
        ct = self.proc.cpu_times()
        self.cpu0 = ct.user + ct.system
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        return self

    def stop(self) -> dict:
        import torch

        self._stop.set()
        self._thread.join()
        ct = self.proc.cpu_times()
        out = {"peak_rss_gb": max(self.peak, self.proc.memory_info().rss) / 2**30, "cpu_s": ct.user + ct.system - self.cpu0}
        if self.device.startswith("cuda"):
            out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return out


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def count_windows(image_size, roi, overlap) -> int:
    """Number of sliding windows MONAI's ``sliding_window_inference`` runs on ``image_size`` (after its padding)."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    size = [max(int(s), int(r)) for s, r in zip(image_size, roi)]
    interval = _get_scan_interval(size, list(roi), len(size), [float(overlap)] * len(size))
    return len(dense_patch_slices(size, list(roi), interval))


def network_args(parser) -> dict:
    return {k: parser.get_parsed_content(k) for k in ("feature_size", "depths", "num_heads", "roi_size", "sw_batch_size", "sw_overlap", "spacing")}


def read_parser(config_files):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(c) for c in config_files])
    return p


def stock_swinunetr(args: dict, flash: bool = False):
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=4, out_channels=3, feature_size=args["feature_size"], depths=tuple(args["depths"]),
                     num_heads=tuple(args["num_heads"]), use_flash_attention=flash)


# ---------------------------------------------------------------------------------------------
# workers (each runs in its own process)
# ---------------------------------------------------------------------------------------------
def worker_stock(spec: dict) -> dict:
    """MONAI's stock pipeline (research-contributions BRATS21/test.py style) with SwinUNETR or SegResNet."""
    import nibabel as nib
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SegResNet
    from monai.transforms import Compose, LoadImaged, NormalizeIntensityd

    from custom.data import list_cases

    device = spec["device"]
    torch.manual_seed(0)
    if spec["model"] == "segresnet":
        net = SegResNet(**SEGRESNET_ARGS)
    else:
        net = stock_swinunetr(spec["net"], flash=spec.get("flash", False))
    net = net.eval().to(device)
    roi, sw, overlap, mode = spec["roi"], spec["sw_batch_size"], spec["overlap"], spec["mode"]
    load = Compose([LoadImaged(keys="image", image_only=True, ensure_channel_first=True),
                    NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)])
    case = list_cases(spec["case_dir"])[0]
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():  # warm-up: one window
        net(torch.zeros(1, 4, *roi, device=device))
    _sync(device)
    rows = []
    for _ in range(spec["repeats"]):
        mem = PeakMemory(device).start()
        t0 = time.perf_counter()
        image = load({"image": list(case.images)})["image"]
        t1 = time.perf_counter()
        with torch.no_grad():
            logits = sliding_window_inference(image[None].to(device), roi, sw, net, overlap=overlap, mode=mode)
        _sync(device)
        t2 = time.perf_counter()
        seg = (torch.sigmoid(logits)[0] > 0.5).cpu().numpy()
        label = np.zeros(seg.shape[1:], np.uint8)
        label[seg[1]] = 2
        label[seg[0]] = 1
        label[seg[2]] = 4
        nib.save(nib.Nifti1Image(label, image.affine.numpy()), str(out_dir / f"{case.case_id}.nii.gz"))
        t3 = time.perf_counter()
        rows.append({"total": t3 - t0, "network": t2 - t1, "crf": 0.0, "other": (t1 - t0) + (t3 - t2), **mem.stop()})
    grid = list(image.shape[1:])
    return {"rows": rows, "grid": grid, "windows": count_windows(grid, roi, overlap), "roi": roi, "overlap": overlap,
            "sw_batch_size": sw, "threads": torch.get_num_threads()}


def worker_bundle(spec: dict) -> dict:
    """The bundle's inference workflow (``ConfigWorkflow``), timed per case; see the module docstring."""
    import numpy as np
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow
    from monai.utils import convert_to_dst_type

    from benchmarks.crf_benchmark import case_seed, oracle_noised_probs
    from custom.data import case_id_from_path, list_cases
    from custom.metrics import spacing_of
    from custom.transforms import LabelToRegions

    device = spec["device"]
    wf = ConfigWorkflow(config_file=spec["configs"], meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=str(CONFIGS / "logging.conf"), workflow_type="infer")
    p = wf.parser
    settings = {"dataset_dir": spec["case_dir"], "output_dir": spec["out_dir"], "use_crf": spec["use_crf"], "num_workers": 0,
                "device": f"$torch.device('{device}')", **spec.get("overrides", {})}
    if spec.get("ckpt"):
        settings["ckpt_path"] = spec["ckpt"]
    else:
        settings["checkpoint_loader#_disabled_"] = True
    if spec["repeats"] > 1:
        settings["datalist"] = [c.to_dict() for c in list_cases(spec["case_dir"])] * spec["repeats"]
    for k, v in settings.items():
        p[k] = v
    wf.initialize()
    evaluator = p.get_parsed_content("evaluator")
    network = p.get_parsed_content("network")
    crf = p.get_parsed_content("crf")
    if spec["use_crf"] != (crf is not None):
        raise RuntimeError("use_crf and the parsed post-processing disagree")
    roi = list(p["roi_size"])

    cached: dict = {}
    if spec.get("oracle"):  # oracle-noised probabilities, computed before the timed pass
        pre = p.get_parsed_content("preprocessing")
        for c in list_cases(spec["case_dir"]):
            d = pre(c.to_dict())
            regions = LabelToRegions(c.layout.convention)(d["label"]).numpy() > 0.5
            image = d["image"]
            probs = oracle_noised_probs(regions, np.any(image.numpy() != 0, 0), spacing_of(image.affine.numpy()), case_seed(c.case_id))
            probs = np.clip(probs.astype(np.float64), 1e-7, 1.0 - 1e-7)
            cached[c.case_id] = torch.from_numpy(np.log(probs / (1.0 - probs)).astype(np.float32))[None]

    class TimedInferer:
        def __init__(self, inner):
            self.inner, self.seconds, self.grid = inner, 0.0, None

        def __call__(self, inputs, net, *args, **kwargs):
            _sync(device)
            t0 = time.perf_counter()
            out = self.inner(inputs, net, *args, **kwargs)
            _sync(device)
            self.seconds = time.perf_counter() - t0
            self.grid = list(inputs.shape[2:])
            if cached:
                cid = case_id_from_path(inputs.meta["filename_or_obj"][0])
                out, *_ = convert_to_dst_type(cached[cid], out, dtype=torch.float32)
            return out

    timed = TimedInferer(evaluator.inferer)
    evaluator.inferer = timed
    with torch.no_grad():  # warm-up: one window
        network(torch.zeros(1, 4, *roi, device=device))
    _sync(device)
    rows: list = []
    state: dict = {}

    def started(engine):
        state["mem"] = PeakMemory(device).start()
        state["t0"] = time.perf_counter()

    def completed(engine):
        _sync(device)
        total = time.perf_counter() - state["t0"]
        crf_s = crf.last_info.get("pred", {}).get("seconds", 0.0) if crf is not None else 0.0
        rows.append({"total": total, "network": timed.seconds, "crf": crf_s, "other": total - timed.seconds - crf_s,
                     "crf_voxels": crf.last_info.get("pred", {}).get("voxels", 0) if crf is not None else 0, **state["mem"].stop()})

    evaluator.add_event_handler(Events.GET_BATCH_STARTED, started)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, completed)
    if spec.get("inference_mode"):
        with torch.inference_mode():
            wf.run()
    else:
        wf.run()
    wf.finalize()
    overlap = float(p["sw_overlap"])
    windows = count_windows(timed.grid, roi, overlap)
    if spec.get("whole"):
        roi = [max(-(-g // 32) * 32, 64) for g in timed.grid]
        windows, overlap = 1, 0.0
    return {"rows": rows, "grid": timed.grid, "windows": windows, "roi": roi, "overlap": overlap,
            "sw_batch_size": int(p.get_parsed_content("sw_batch_size")), "threads": torch.get_num_threads(), "oracle": bool(cached)}


def worker_window(spec: dict) -> dict:
    """Network-level options on one roi-sized window: seconds per window and max |logit difference|."""
    import copy

    import torch

    from custom.networks import SwinUNETRAttSE
    from custom.networks.fast_inference import accelerate

    device = spec["device"]
    args = spec["net"]
    roi = args["roi_size"]
    torch.manual_seed(0)
    x1 = torch.randn(1, 4, *roi, device=device)
    ours_kw = dict(feature_size=args["feature_size"], depths=tuple(args["depths"]), num_heads=tuple(args["num_heads"]),
                   spatial_attention=spec["spatial_attention"], squeeze_excitation=spec["squeeze_excitation"],
                   dropout_prob=spec["dropout_prob"], use_flash_attention=True)
    stock = stock_swinunetr(args, flash=False).eval().to(device)
    stock_flash = copy.deepcopy(stock)
    for m in stock_flash.modules():
        if hasattr(m, "use_flash_attention"):
            m.use_flash_attention = True
    ours_before = SwinUNETRAttSE(**ours_kw).eval().to(device)
    ours = accelerate(copy.deepcopy(ours_before))
    variants = {
        "monai_swinunetr": (stock, "MONAI SwinUNETR, stock (use_flash_attention=False)", "monai_swinunetr", {}),
        "monai_swinunetr_flash": (stock_flash, "MONAI SwinUNETR, use_flash_attention=True", "monai_swinunetr", {}),
        "monai_swinunetr_flash_accel": (accelerate(copy.deepcopy(stock_flash)), "MONAI SwinUNETR, flash + accelerate()", "monai_swinunetr", {}),
        "ours_before": (ours_before, "ours (attention+SE), flash, before accelerate()", "ours_before", {}),
        "ours": (ours, "ours, flash + accelerate() (shipped)", "ours_before", {}),
        "ours_inference_mode": (ours, "ours shipped, torch.inference_mode instead of no_grad", "ours_before", {"inference_mode": True}),
        "ours_channels_last": (ours, "ours shipped, channels_last_3d", "ours_before", {"channels_last": True}),
        "ours_bf16": (ours, "ours shipped, bfloat16 autocast", "ours_before", {"autocast": torch.bfloat16}),
    }
    for b in spec["batches"]:
        if b != 1:
            variants[f"ours_batch{b}"] = (ours, f"ours shipped, {b} windows per forward (sw_batch_size {b})", "ours_before", {"batch": b})
    selected = [v for v in spec["variants"] if v in variants]
    results: dict = {}
    outputs: dict = {}

    def run(net, opts):
        x = x1.expand(opts.get("batch", 1), *x1.shape[1:]).contiguous()
        if opts.get("channels_last"):
            net = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        ctx = torch.inference_mode() if opts.get("inference_mode") else torch.no_grad()
        with ctx:
            if opts.get("autocast") is not None:
                with torch.autocast(device_type=device.split(":")[0], dtype=opts["autocast"]):
                    y = net(x)
            else:
                y = net(x)
        _sync(device)
        return y[:1].float()

    run(ours, {})  # warm-up (process, allocator, oneDNN)
    for name in selected:
        net, label, ref, opts = variants[name]
        times = []
        for _ in range(spec["repeats"]):
            mem = PeakMemory(device).start()
            t0 = time.perf_counter()
            y = run(net, opts)
            times.append(time.perf_counter() - t0)
            peak = mem.stop()
        outputs.setdefault(name, y)
        diff = None
        if ref in outputs and ref != name:
            diff = float((outputs[ref] - y).abs().max())
        results[name] = {"label": label, "seconds": min(times), "seconds_per_window": min(times) / opts.get("batch", 1),
                         "max_abs_diff": diff, "reference": ref, **peak}
        print(f"[window] {name}: {min(times):.2f} s", flush=True)
    return {"results": results, "roi": roi, "threads": torch.get_num_threads()}


def worker_flops(spec: dict) -> dict:
    """FLOPs of one forward (meta tensors, ``FlopCounterMode``) and the measured peak matmul / conv FLOP/s."""
    import torch
    from monai.networks.nets import SegResNet
    from torch.utils.flop_counter import FlopCounterMode

    from custom.networks import SwinUNETRAttSE

    args = spec["net"]

    def count(net, shape):
        net = net.to("meta").eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            net(torch.empty(*shape, device="meta"))
        return fc.get_total_flops()

    roi = args["roi_size"]
    flops = {  # flash off: attention as explicit matmuls, which the counter sees (same arithmetic)
        "monai_swinunetr": count(stock_swinunetr(args, flash=False), (1, 4, *roi)),
        "ours": count(SwinUNETRAttSE(feature_size=args["feature_size"], depths=tuple(args["depths"]), num_heads=tuple(args["num_heads"]),
                                     spatial_attention=spec["spatial_attention"], squeeze_excitation=spec["squeeze_excitation"],
                                     dropout_prob=spec["dropout_prob"], use_flash_attention=False), (1, 4, *roi)),
        "monai_segresnet": count(SegResNet(**SEGRESNET_ARGS), (1, 4, *SEGRESNET["roi"])),
    }
    if spec.get("whole_shape"):
        flops["ours_whole"] = count(SwinUNETRAttSE(feature_size=args["feature_size"], depths=tuple(args["depths"]),
                                                   num_heads=tuple(args["num_heads"]), spatial_attention=spec["spatial_attention"],
                                                   squeeze_excitation=spec["squeeze_excitation"], dropout_prob=spec["dropout_prob"],
                                                   use_flash_attention=False), (1, 4, *spec["whole_shape"]))
    device = spec["device"]

    def best(f, n):
        f()
        _sync(device)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        return min(ts)

    peak = {}
    n = spec["matmul_size"]
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        peak[f"matmul_{str(dt).split('.')[-1]}"] = 2 * n**3 / best(lambda: a @ b, spec["matmul_repeats"])
    c = spec["conv_size"]
    conv = torch.nn.Conv3d(args["feature_size"], args["feature_size"], 3, padding=1).to(device).eval()
    x = torch.randn(1, args["feature_size"], c, c, c, device=device)
    with torch.no_grad():
        peak["conv3d_float32"] = 2 * args["feature_size"] ** 2 * 27 * c**3 / best(lambda: conv(x), 2)
    return {"flops_per_window": flops, "peak": peak, "matmul_size": n, "conv_size": c, "threads": torch.get_num_threads()}


def worker_check(spec: dict) -> dict:
    """Output agreement on a trained model: the bundle's preprocessing and inferer, reference network vs the
    fast variants, Dice of the thresholded regions (network grid) against the reference and the ground truth."""
    import copy

    import numpy as np
    import torch

    from custom.data import list_cases
    from custom.metrics import region_dice
    from custom.networks.fast_inference import WholeVolumeInferer, accelerate
    from custom.transforms import LabelToRegions

    p = read_parser(spec["configs"])
    p["dataset_dir"] = spec["case_dirs"][0]
    device = spec["device"]
    p["device"] = f"$torch.device('{device}')"
    ref = p.get_parsed_content("network_def").to(device).eval()
    state = torch.load(spec["ckpt"], map_location=device, weights_only=True)
    ref.load_state_dict(state.get("model", state) if isinstance(state, dict) and "model" in state else state)
    fast = accelerate(copy.deepcopy(ref))
    inferer = p.get_parsed_content("inferer")
    whole = WholeVolumeInferer()
    variants = {"accelerate": (fast, None, inferer), "accelerate_bf16": (fast, torch.bfloat16, inferer),
                "accelerate_whole_volume (not shipped)": (fast, None, whole)}
    dices: dict = {k: [] for k in variants}
    gt_dice: dict = {k: [] for k in ("reference", *variants)}
    maxdiff: dict = {k: 0.0 for k in variants}
    cases_done = []
    for case_dir in spec["case_dirs"]:
        p["dataset_dir"] = case_dir
        pre = p.get_parsed_content("preprocessing", lazy=False)
        for c in list_cases(case_dir)[: spec["max_cases"]]:
            d = pre(c.to_dict())
            x = d["image"][None].to(device)
            gt = LabelToRegions(c.layout.convention)(d["label"]).numpy() > 0.5
            with torch.no_grad():
                y_ref = torch.sigmoid(inferer(x, ref))[0].float().cpu()
                gt_dice["reference"].append(region_dice(y_ref.numpy() > 0.5, gt))
                for name, (net, dt, inf) in variants.items():
                    if dt is None:
                        y = torch.sigmoid(inf(x, net))[0].float().cpu()
                    else:
                        with torch.autocast(device_type=device.split(":")[0], dtype=dt):
                            y = torch.sigmoid(inf(x, net))[0].float().cpu()
                    dices[name].append(region_dice(y.numpy() > 0.5, y_ref.numpy() > 0.5))
                    gt_dice[name].append(region_dice(y.numpy() > 0.5, gt))
                    maxdiff[name] = max(maxdiff[name], float((y - y_ref).abs().max()))
            cases_done.append(f"{os.path.basename(case_dir)}/{c.case_id} {list(x.shape[2:])}")

    def mean_min(rows):
        return {r: (float(np.mean([row[r] for row in rows])), float(np.min([row[r] for row in rows]))) for r in ("TC", "WT", "ET")}

    return {"cases": cases_done, "agreement": {k: mean_min(v) for k, v in dices.items()},
            "gt": {k: mean_min(v) for k, v in gt_dice.items()}, "max_abs_prob_diff": maxdiff}


WORKERS = {"stock": worker_stock, "bundle": worker_bundle, "window": worker_window, "flops": worker_flops, "check": worker_check}


_REUSE = False  # --resume


def run_worker(kind: str, spec: dict, log: Path, threads: int | None, cache: Path | None = None) -> dict:
    """Run one worker in a fresh process. With ``cache`` (a JSON file), a result stored there for the same
    kind and spec is returned instead (``--resume``), and a new result is stored there."""
    if cache is not None and _REUSE and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("kind") == kind and stored.get("spec") == spec:
            print(f"# reusing {cache}", flush=True)
            return stored["result"]
    result = run_step(__file__, kind, spec, log, threads)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"kind": kind, "spec": spec, "result": result, "when": time.strftime("%Y-%m-%d %H:%M")}))
    return result


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _ensure_case(case_dir: Path, size: str, seed: int) -> None:
    from custom.data import list_cases

    if case_dir.is_dir() and any(case_dir.iterdir()):
        return
    from custom.synthetic import write_dataset

    print(f"# writing one synthetic {size} case (seed {seed}) to {case_dir}", flush=True)
    write_dataset(case_dir, 1, seed=seed, layout="brats2021", size=size)
    list_cases(case_dir)


def _mean(rows, key):
    return statistics.fmean(r[key] for r in rows)


def _mem(rows) -> str:
    s = f"{max(r['peak_rss_gb'] for r in rows):.1f}"
    if "peak_cuda_gb" in rows[0]:
        s += f" (CUDA {max(r['peak_cuda_gb'] for r in rows):.1f})"
    return s


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if serve_step(argv, WORKERS):
        return 0

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="override config(s) after inference.json, e.g. bundle/configs/quick.json")
    ap.add_argument("--case_dir", type=Path, help="a BraTS-layout folder with one labelled case (default: a synthetic case, written if absent)")
    ap.add_argument("--size", choices=("full", "small"), default="full", help="synthetic case size when --case_dir is not given (default full: 240x240x155)")
    ap.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the workers (default: torch's)")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per pipeline (default 1; the mean is reported)")
    ap.add_argument("--pipelines", default="monai-swinunetr,monai-swinunetr-bundle,monai-segresnet,ours-before,ours,ours-crf,ours-whole-crf",
                    help="comma-separated subset of the pipelines (see the module docstring)")
    ap.add_argument("--stock_overlap", type=float, default=STOCK_SWIN["overlap"],
                    help="overlap of the stock SwinUNETR pipeline (default 0.6, MONAI's BRATS21 script)")
    ap.add_argument("--stock_sw_batch_size", type=int, default=STOCK_SWIN["sw_batch_size"])
    ap.add_argument("--window", default="monai_swinunetr,monai_swinunetr_flash,monai_swinunetr_flash_accel,ours_before,ours,"
                    "ours_inference_mode,ours_channels_last,ours_bf16", help="network-level options to time on one window ('' to skip)")
    ap.add_argument("--window_batches", default="2,4", help="windows per forward to time besides 1 (default 2,4)")
    ap.add_argument("--window_repeats", type=int, default=1)
    ap.add_argument("--scaling", default="1.0,1.25,1.5", help="resampling spacings (mm) for the time-vs-voxels table ('' to skip)")
    ap.add_argument("--no_flops", action="store_true", help="skip the FLOP count and the peak matmul measurement")
    ap.add_argument("--check_bundle_root", type=lambda t: Path(t) if t else None, default=REPO / "runs" / "demo",
                    help="trained bundle (models/model.pt, quick.json settings) for the output-agreement check (default runs/demo; skipped if absent)")
    ap.add_argument("--ckpt", type=lambda t: Path(t) if t else None, default=None,
                    help="trained weights for the 'ours' pipelines (e.g. bundle/models/model.pt): the CRF then works on the model's own "
                         "probabilities instead of oracle-noised ones (default: random weights)")
    ap.add_argument("--work_dir", type=Path, default=REPO / "runs" / "inference_speed")
    ap.add_argument("--resume", action="store_true", help="reuse results stored in --work_dir by an earlier run with identical settings "
                    "(each step's result is stored as it finishes; their load averages are those of the earlier run)")
    ap.add_argument("--smoke", action="store_true", help="tiny run for tests: small case, quick.json, few pipelines, no scaling/FLOPs")
    ap.add_argument("--out", type=Path, help="also write the tables (markdown) to this file")
    args = ap.parse_args(argv)

    if args.smoke:
        args.config = args.config or [str(CONFIGS / "quick.json")]
        args.size = "small"
        args.pipelines = "monai-swinunetr,ours-crf"
        args.window, args.window_batches, args.scaling, args.no_flops = "ours_before,ours", "", "", True
        args.check_bundle_root = None
        args.stock_overlap = 0.25
    configs = [str(CONFIGS / "inference.json"), *[str(Path(c).resolve()) for c in args.config]]
    parser = read_parser(configs)
    net = network_args(parser)
    work = args.work_dir.resolve()
    log = work / "workers.log"
    case_dir = (args.case_dir or (REPO / "data" / f"speed_{args.size}")).resolve()
    _ensure_case(case_dir, args.size, seed=2)
    device = args.device
    pipelines = [x for x in args.pipelines.split(",") if x]
    common_net = {"spatial_attention": bool(parser["spatial_attention"]), "squeeze_excitation": bool(parser["squeeze_excitation"]),
                  "dropout_prob": float(parser["dropout_prob"])}
    stock_bundle_over = {
        "network_def": {"_target_": "SwinUNETR", "in_channels": 4, "out_channels": 3, "feature_size": "@feature_size",
                        "depths": "@depths", "num_heads": "@num_heads", "use_flash_attention": False},
        "network": "$@network_def.to(@device)"}
    before_over = {"network": "$@network_def.to(@device)"}
    roi = list(net["roi_size"])

    t_all = time.perf_counter()
    load_start = load_average()

    global _REUSE
    _REUSE = args.resume

    def cache(step: str) -> Path:
        return work / "results" / f"{step}.json"

    print(f"# inference_speed: configs {configs}; width {net['feature_size']}; case {case_dir}; device {device}; "
          f"load {load_start}", flush=True)
    results: dict = {}
    labels = {
        "monai-swinunetr": f"MONAI SwinUNETR, stock pipeline (no crop, overlap {args.stock_overlap}, "
                           f"sw_batch {args.stock_sw_batch_size}, constant blend, flash off)",
        "monai-swinunetr-bundle": "MONAI SwinUNETR (flash off) in our bundle pipeline, no CRF",
        "monai-segresnet": "MONAI SegResNet, BraTS-bundle settings (roi 240x240x160, overlap 0.5, sw_batch 1)",
        "ours-before": "ours, before the speed work (no accelerate()), no CRF",
        "ours-before-crf": "ours, before the speed work, with CRF",
        "ours": "ours (inference.json as shipped), no CRF",
        "ours-crf": "ours (inference.json as shipped), with CRF",
        "ours-whole": "ours shipped but ONE whole-volume pass (WholeVolumeInferer; not shipped, changes outputs), no CRF",
        "ours-whole-crf": "ours shipped but ONE whole-volume pass (not shipped), with CRF",
    }
    for name in pipelines:
        if name not in labels:
            ap.error(f"unknown pipeline {name}; choose from {list(labels)}")
        out_dir = str(work / "predictions" / name)
        if name == "monai-swinunetr":
            spec = {"model": "swinunetr", "net": net, "roi": roi, "overlap": args.stock_overlap, "sw_batch_size": args.stock_sw_batch_size,
                    "mode": "constant", "case_dir": str(case_dir), "out_dir": out_dir, "repeats": args.repeats, "device": device}
            r = run_worker("stock", spec, log, args.threads, cache(name))
        elif name == "monai-segresnet":
            spec = {"model": "segresnet", "net": net, "roi": SEGRESNET["roi"], "overlap": SEGRESNET["overlap"],
                    "sw_batch_size": SEGRESNET["sw_batch_size"], "mode": "constant", "case_dir": str(case_dir), "out_dir": out_dir,
                    "repeats": args.repeats, "device": device}
            r = run_worker("stock", spec, log, args.threads, cache(name))
        else:
            over = stock_bundle_over if name == "monai-swinunetr-bundle" else before_over if name.startswith("ours-before") else {}
            if name.startswith("ours-whole"):
                over = {"inferer": {"_target_": "custom.networks.fast_inference.WholeVolumeInferer"}}
            trained = args.ckpt is not None and name.startswith("ours")
            spec = {"configs": configs, "overrides": over, "use_crf": name.endswith("-crf"), "case_dir": str(case_dir), "out_dir": out_dir,
                    "repeats": args.repeats, "device": device, "oracle": not trained, "whole": name.startswith("ours-whole")}
            if trained:
                spec["ckpt"] = str(args.ckpt)
            r = run_worker("bundle", spec, log, args.threads, cache(name))
        r.setdefault("load", load_average())
        results[name] = r
        print(f"[{name}] {_mean(r['rows'], 'total'):.1f} s/case (network {_mean(r['rows'], 'network'):.1f} s, {r['windows']} windows of "
              f"{r['roi']} on a {r['grid']} grid), peak RSS {_mem(r['rows'])} GB; load {r['load']}", flush=True)

    window = None
    if args.window:
        batches = [int(b) for b in args.window_batches.split(",") if b]
        window = run_worker("window", {"net": net, **common_net, "variants": args.window.split(",") + [f"ours_batch{b}" for b in batches if b != 1],
                                       "batches": batches, "repeats": args.window_repeats, "device": device}, log, args.threads,
                            cache("window"))
        window.setdefault("load", load_average())

    scaling = []
    for s in [float(x) for x in args.scaling.split(",") if x]:
        if "ours" in results and [s, s, s] == [float(v) for v in net["spacing"]]:
            r = dict(results["ours"], spacing=s)
            scaling.append(r)
            continue
        spec = {"configs": configs, "overrides": {"spacing": [s, s, s]}, "use_crf": False, "case_dir": str(case_dir),
                "out_dir": str(work / "predictions" / f"scaling_{s}"), "repeats": args.repeats, "device": device, "oracle": False}
        r = run_worker("bundle", spec, log, args.threads, cache(f"scaling_{s}"))
        r["spacing"] = s
        r.setdefault("load", load_average())
        scaling.append(r)
        print(f"[scaling] {s} mm: {_mean(r['rows'], 'total'):.1f} s/case, grid {r['grid']}, {r['windows']} windows; load {r['load']}", flush=True)

    flops = None
    if not args.no_flops:
        whole = next((r["roi"] for n, r in results.items() if n.startswith("ours-whole")), None)
        flops = run_worker("flops", {"net": net, **common_net, "device": device, "matmul_size": 4096, "matmul_repeats": 3,
                                     "conv_size": min(roi), "whole_shape": whole}, log, args.threads, cache("flops"))
        flops.setdefault("load", load_average())

    check = None
    ckpt = args.check_bundle_root / "models" / "model.pt" if args.check_bundle_root else None
    if ckpt is not None and ckpt.is_file():
        heldout = REPO / "data" / "synthetic_heldout"
        dirs = [str(case_dir)] + ([str(heldout)] if heldout.is_dir() else [])
        check = run_worker("check", {"configs": [str(CONFIGS / "inference.json"), str(CONFIGS / "quick.json")], "ckpt": str(ckpt),
                                     "case_dirs": dirs, "max_cases": 8, "device": device}, log, args.threads, cache("check"))
        check["ckpt"] = str(ckpt)

    text = report(argv, configs, net, case_dir, device, results, labels, window, scaling, flops, check, load_start,
                  time.perf_counter() - t_all, args.ckpt)
    emit_tables(text, args.out)
    return 0


def report(argv, configs, net, case_dir, device, results, labels, window, scaling, flops, check, load_start, wall, ckpt=None) -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        import torch

        threads = torch.get_num_threads()
        tv = torch.__version__
        import monai

        mv = monai.__version__
    except Exception:  # pragma: no cover
        threads, tv, mv = "?", "?", "?"
    L = [
        "## Inference speed",
        "",
        f"Command: `python -m benchmarks.inference_speed {' '.join(argv)}`  ",
        f"Configs {', '.join(Path(c).name for c in configs)}; width (feature_size) {net['feature_size']}, depths {net['depths']}, "
        f"roi {net['roi_size']}, sw_batch_size {net['sw_batch_size']}, overlap {net['sw_overlap']}, spacing {net['spacing']}; "
        f"case {case_dir}; device {device}, {os.cpu_count()} CPUs ({cpu}), torch {threads} threads, torch {tv}, MONAI {mv}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; total {wall / 60:.1f} min; load average (1/5/15 min) at the start {load_start}.",
        "",
    ]
    if results:
        ref = results.get("monai-swinunetr")
        ref_t = _mean(ref["rows"], "total") if ref else None
        refb = results.get("monai-swinunetr-bundle")
        refb_t = _mean(refb["rows"], "total") if refb else None
        L += ["End-to-end seconds per case (load, preprocess, network incl. sliding-window aggregation, CRF, post-process, "
              "write); 'other' = everything but network and CRF; 'CPU s' = the process's CPU time during the case (all threads). "
              + (f"'ours' rows: trained weights {ckpt} (the CRF works on their probabilities); other rows random weights."
                 if ckpt else "Random weights; the bundle rows feed the CRF oracle-noised probabilities (see the script's docstring)."), "",
              "| pipeline | network grid | windows (roi, overlap) | s/case | network s | CRF s | other s | CPU s | peak RSS GB "
              "| x stock SwinUNETR | x stock SwinUNETR in our pipeline | load after |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in results.items():
            t = _mean(r["rows"], "total")
            ratio = f"{t / ref_t:.2f}" if ref_t else "-"
            ratio_b = f"{t / refb_t:.2f}" if refb_t else "-"
            L.append(f"| {labels[name]} | {'x'.join(map(str, r['grid']))} | {r['windows']} ({'x'.join(map(str, r['roi']))}, {r['overlap']}) | "
                     f"{t:.1f} | {_mean(r['rows'], 'network'):.1f} | {_mean(r['rows'], 'crf'):.2f} | {_mean(r['rows'], 'other'):.1f} | "
                     f"{_mean(r['rows'], 'cpu_s'):.0f} | {_mem(r['rows'])} | {ratio} | {ratio_b} | {r['load']} |")
        L.append("")
    if window:
        L += [f"Network-level options, one window {'x'.join(map(str, window['roi']))} of random input, random weights (best of "
              f"the timed forwards; 'max abs diff' = largest logit difference to the reference network with the same weights); "
              f"load after {window['load']}.", "",
              "| variant | s per forward | s per window | CPU s per forward | max abs diff | reference | peak RSS GB |", "|---|---|---|---|---|---|---|"]
        for name, r in window["results"].items():
            d = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
            L.append(f"| {r['label']} | {r['seconds']:.2f} | {r['seconds_per_window']:.2f} | {r['cpu_s']:.1f} | {d} "
                     f"| {r['reference']} | {r['peak_rss_gb']:.1f} |")
        L.append("")
    if results:
        grid = next((r["grid"] for n, r in results.items() if n.startswith("ours")), None)
        full = results.get("monai-swinunetr", {}).get("grid")
        if grid:
            roi = net["roi_size"]
            L += ["Sliding windows per overlap (MONAI's window placement; the cost is proportional to the number of windows):", "",
                  "| grid | " + " | ".join(f"overlap {o}" for o in (0.25, 0.5, 0.6, 0.7)) + " |", "|---|---|---|---|---|"]
            for g, what in ((grid, "our crop"), (full, "whole volume")):
                if g:
                    L.append(f"| {'x'.join(map(str, g))} ({what}) | " + " | ".join(str(count_windows(g, roi, o)) for o in (0.25, 0.5, 0.6, 0.7)) + " |")
            L.append("")
    if scaling:
        L += ["Time against the number of voxels: our pipeline (shipped, no CRF, random weights: outputs not meaningful) "
              "with the resampling spacing overridden:", "",
              "| spacing mm | network grid | voxels (M) | windows | s/case | network s | s per M voxels | load after |", "|---|---|---|---|---|---|---|---|"]
        for r in scaling:
            vox = 1
            for s in r["grid"]:
                vox *= s
            t = _mean(r["rows"], "total")
            L.append(f"| {r['spacing']} | {'x'.join(map(str, r['grid']))} | {vox / 1e6:.2f} | {r['windows']} | {t:.1f} | "
                     f"{_mean(r['rows'], 'network'):.1f} | {t / (vox / 1e6):.2f} | {r['load']} |")
        L.append("")
    if flops:
        pk = flops["peak"]
        L += [f"FLOPs (multiply-add = 2) and the physical limit: measured peak float32 matmul {pk['matmul_float32'] / 1e9:.0f} GFLOP/s "
              f"({flops['matmul_size']}^2 GEMM; bfloat16 {pk['matmul_bfloat16'] / 1e9:.0f} GFLOP/s), 3x3x3 convolution "
              f"{net['feature_size']}->{net['feature_size']} channels on {flops['conv_size']}^3: {pk['conv3d_float32'] / 1e9:.0f} GFLOP/s; "
              f"load after {flops['load']}.", "",
              "| network | GFLOP per window | windows per case | TFLOP per case | lower bound s (at peak matmul) | measured network s | achieved GFLOP/s |",
              "|---|---|---|---|---|---|---|"]
        pairs = [("monai_swinunetr", "monai-swinunetr"), ("monai_swinunetr", "monai-swinunetr-bundle"), ("monai_segresnet", "monai-segresnet"),
                 ("ours", "ours-before"), ("ours", "ours"), ("ours_whole", "ours-whole"), ("ours_whole", "ours-whole-crf")]
        for fk, pk_name in pairs:
            r = results.get(pk_name)
            if not r or fk not in flops["flops_per_window"]:
                continue
            f = flops["flops_per_window"][fk]
            total = f * r["windows"]
            net_s = _mean(r["rows"], "network")
            L.append(f"| {labels[pk_name]} | {f / 1e9:.0f} | {r['windows']} | {total / 1e12:.1f} | {total / pk['matmul_float32']:.1f} | "
                     f"{net_s:.1f} | {total / net_s / 1e9:.0f} |")
        L.append("")
    if check:
        L += [f"Output agreement of the fast paths on a TRAINED model ({check['ckpt']}, quick.json: width 12, 2.5 mm), "
              f"network grid, thresholded regions; cases: {', '.join(check['cases'])}.", "",
              "| variant | Dice to reference TC / WT / ET (mean, min) | Dice to ground truth TC / WT / ET (mean) | max abs probability diff |",
              "|---|---|---|---|"]
        g = check["gt"]["reference"]
        L.append("| reference (no accelerate, float32) | 1 / 1 / 1 | " + " / ".join(f"{g[r][0]:.4f}" for r in ("TC", "WT", "ET")) + " | 0 |")
        for name, a in check["agreement"].items():
            g = check["gt"][name]
            L.append(f"| {name} | " + " / ".join(f"{a[r][0]:.5f} ({a[r][1]:.5f})" for r in ("TC", "WT", "ET")) + " | "
                     + " / ".join(f"{g[r][0]:.4f}" for r in ("TC", "WT", "ET")) + f" | {check['max_abs_prob_diff'][name]:.1e} |")
        L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    raise SystemExit(main())
