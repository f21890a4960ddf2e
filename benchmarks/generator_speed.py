"""What generating training images costs: our generator against what TorchIO, cornucopia and MONAI offer.

    python -m benchmarks.generator_speed --out benchmarks/results/generator_speed.md [--cases 4]

One thread everywhere (``torch.set_num_threads(1)``; the generator is NumPy), seconds per case:

* ``custom.synthetic.generate_case`` at 2 mm (``medium``, the shipped model's grid) and 1 mm
  (``full``): anatomy, tumour labels and all four images;
* image formation alone from the same label map (one case's 2 mm labels: background split into
  white matter, grey matter and CSF, plus NCR, ED, ET), four sequences:
  TorchIO ``RandomLabelsToImage`` + ``RandomAnisotropy`` + ``RandomMotion`` + ``RandomGhosting`` +
  ``RandomBiasField`` + ``RandomNoise``, and cornucopia ``SynthFromLabelTransform`` (SynthSeg style);
  each only when the package is installed (neither is a project dependency);
* MONAI's random intensity transforms on a whole 4-channel 2 mm case and on a 64^3 training crop
  (``RandBiasField``, ``RandRicianNoise``, ``RandGibbsNoise``, ``RandKSpaceSpikeNoise``,
  ``RandSimulateLowResolution``, ``RandHistogramShift``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (imports, caches)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=4, help="cases timed per row (default 4)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from custom.synthetic import generate_case

    rows = []
    for size in ("medium", "full"):
        i = iter(range(1000, 2000))
        rows.append((f"ours: generate_case, {size} ({'2 mm, 120x120x78' if size == 'medium' else '1 mm, 240x240x155'}), labels + 4 images",
                     _time(lambda: generate_case(next(i), 5, size), args.cases)))
    images, seg, _, maps = generate_case(3, 5, "medium", return_maps=True)
    tissue = np.argmax(np.stack([maps["wm"], maps["gm"], maps["csf"]]), 0) + 1
    label_map = np.where(maps["brain"], tissue, 0)
    label_map[seg > 0] = seg[seg > 0] + 3  # 1-3 tissues, 4 NCR, 5 ED, 6 ET
    lab = torch.as_tensor(label_map[None].astype(np.int64))
    try:
        import torchio as tio

        pipeline = tio.Compose([tio.RandomLabelsToImage(label_key="label", image_key="img"), tio.RandomAnisotropy(p=0.5),
                                tio.RandomMotion(p=0.3), tio.RandomGhosting(p=0.3), tio.RandomBiasField(), tio.RandomNoise()])
        subject = tio.Subject(label=tio.LabelMap(tensor=lab, affine=np.diag([2.0, 2.0, 2.0, 1.0])))
        rows.append((f"TorchIO {tio.__version__}: RandomLabelsToImage + Anisotropy + Motion + Ghosting + BiasField + Noise, 4 sequences",
                     _time(lambda: [pipeline(subject) for _ in range(4)], args.cases)))
    except ImportError:
        rows.append(("TorchIO: not installed", float("nan")))
    try:
        import cornucopia as cc

        synth = cc.SynthFromLabelTransform(order=1)
        lab_cc = lab.clone()
        rows.append(("cornucopia: SynthFromLabelTransform (deformation, contrast, bias, noise, resolution), 4 sequences",
                     _time(lambda: [synth(lab_cc) for _ in range(4)], args.cases)))
    except ImportError:
        rows.append(("cornucopia: not installed", float("nan")))
    from monai import transforms as mt

    case = torch.as_tensor(np.stack([np.asarray(images[m], np.float32) for m in ("t1", "t1ce", "t2", "flair")]))
    crop = case[:, 28:92, 28:92, 7:71].clone()
    monai_tf = {
        "RandBiasField": mt.RandBiasField(prob=1.0), "RandRicianNoise": mt.RandRicianNoise(prob=1.0, std=0.05),
        "RandGibbsNoise": mt.RandGibbsNoise(prob=1.0, alpha=(0.3, 0.7)), "RandKSpaceSpikeNoise": mt.RandKSpaceSpikeNoise(prob=1.0),
        "RandSimulateLowResolution": mt.RandSimulateLowResolution(prob=1.0, zoom_range=(0.4, 0.8)),
        "RandHistogramShift": mt.RandHistogramShift(prob=1.0),
    }
    for name, tf in monai_tf.items():
        rows.append((f"MONAI {name}: whole 4-channel 2 mm case / one 64^3 crop", (_time(lambda: tf(case), args.cases), _time(lambda: tf(crop), args.cases))))
    lines = ["# Generating training images: seconds per case, one thread", "",
             f"{dt.datetime.now().isoformat(timespec='seconds')}, {platform.machine()}, {os.cpu_count()} CPUs, "
             f"load average {os.getloadavg()[0]:.2f}; mean of {args.cases} after one warm-up", "",
             "| what | s per case (crop) |", "|---|---|"]
    for name, t in rows:
        lines.append(f"| {name} | " + (f"{t[0]:.3f} ({t[1]:.3f})" if isinstance(t, tuple) else f"{t:.3f}") + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
