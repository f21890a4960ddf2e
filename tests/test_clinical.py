"""The bundle's clinical inference (``inference.json`` + ``clinical.json``) on a folder of raw studies.

A generated raw study (custom.synthetic.raw_study: a head, every series on its own grid and pose,
clinical file names) and one study without FLAIR or T2 go through ``python -m monai.bundle run
inference`` with the shipped model. The study folder also holds what a scanner's export does: a
coarser reformat of the T1ce, a T2* and a diffusion series, none of which may be used. The labels
must lie on each study's reference series (T1ce) and agree with the labels of the BraTS-ready
version of the same case carried onto that series through the generator's true poses; the study
that cannot be used is named, and the others are still written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from custom.synthetic import write_dataset
from custom.synthetic.raw_study import generate_raw_study
from devtools import REPO

SEED, SIZE = 5, "small"
CLINICAL_NAMES = {"t1": "T1_MPRAGE", "t1ce": "3D_T1_POST_GD", "t2": "AX_T2_TSE", "flair": "T2_FLAIR_SAG"}


def _reformat(src: Path, dst: Path, step: int = 2) -> None:
    """A coarser reformat of ``src`` (every ``step``-th voxel), as a scanner's MPR series."""
    img = nib.load(src)
    aff = img.affine.copy()
    aff[:3, :3] *= step
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::step, ::step, ::step], aff), dst)


def _bundle_inference(dataset: Path, out: Path, configs: list[str], *extra: str) -> subprocess.CompletedProcess:
    cfg = "[" + ",".join(f"'{REPO / 'bundle' / 'configs' / c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", cfg,
           "--logging_file", str(REPO / "bundle" / "configs" / "logging.conf"),
           "--dataset_dir", str(dataset), "--output_dir", str(out), "--num_workers", "0", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def clinical_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("clinical")
    studies = {}
    for index in (0,):
        raw = generate_raw_study(index, SEED, root / "raw", size=SIZE, voxel_scale=2.0)
        d = root / "studies" / f"S{index}"
        d.mkdir(parents=True)
        for seq, path in raw.series.items():
            (d / f"{CLINICAL_NAMES[seq]}.nii.gz").symlink_to(path)
        _reformat(raw.series["t1ce"], d / "COR_T1_POST_GD_MPR.nii.gz")  # a second T1ce, smaller: passed over
        (d / "AX_T2_STAR_GRE.nii.gz").symlink_to(raw.series["t2"])  # T2*: as large as the T2, so a T2 rule taking it fails
        (d / "DWI_b1000.nii.gz").symlink_to(raw.series["flair"])
        studies[d.name] = raw
    bad = root / "studies" / "T1ONLY"
    bad.mkdir()
    (bad / "T1_MPRAGE.nii.gz").symlink_to(studies["S0"].series["t1"])
    out = root / "out"
    proc = _bundle_inference(root / "studies", out, ["inference.json", "clinical.json"], "--prepared_spacing", "2.0")
    return root, studies, out, proc


def test_unusable_study_named_and_others_written(clinical_run):
    _, studies, out, proc = clinical_run
    assert proc.returncode != 0, proc.stdout[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "1 of 2 cases not segmented" in last and "T1ONLY" in last and ("FLAIR" in last or "T2" in last), last
    for name in studies:
        assert (out / f"{name}.nii.gz").is_file(), proc.stderr[-3000:]
        report = out / "prepared" / name / f"{name}_preparation.json"
        assert report.is_file()
        used = {s: Path(r["source"]).name for s, r in json.loads(report.read_text())["series"].items()}
        assert used == {s: f"{CLINICAL_NAMES[s]}.nii.gz" for s in CLINICAL_NAMES}, used
    assert not (out / "T1ONLY.nii.gz").exists()


def test_labels_lie_on_the_reference_series_and_match_the_brats_ready_case(clinical_run):
    root, studies, out, _ = clinical_run
    brats = root / "brats_ready"
    write_dataset(brats, 1, seed=SEED, layout="brats2021", size=SIZE)
    ready_out = root / "ready_out"
    proc = _bundle_inference(brats, ready_out, ["inference.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for index, (name, raw) in enumerate(studies.items()):
        ref = nib.load(raw.series[raw.reference])
        got = nib.load(out / f"{name}.nii.gz")
        assert got.shape == ref.shape and np.allclose(got.affine, ref.affine, atol=1e-4)
        label = np.asarray(got.dataobj)
        assert set(np.unique(label)) <= {0, 1, 2, 4}
        ready = ready_out / f"BraTS2021_{index:05d}.nii.gz"
        ready_img = nib.load(ready)
        # reference voxel -> reference world -> head frame (the case's world) -> BraTS-ready voxel
        m = np.linalg.inv(ready_img.affine) @ np.linalg.inv(raw.poses[raw.reference]) @ ref.affine
        carried = ndi.affine_transform(np.asarray(ready_img.dataobj).astype(np.uint8), m[:3, :3], m[:3, 3], ref.shape, order=0)
        wt_raw, wt_ready = label > 0, carried > 0
        assert wt_ready.sum() > 1000, "the BraTS-ready prediction has no tumour to compare"
        assert _dice(wt_raw, wt_ready) >= 0.8, (name, _dice(wt_raw, wt_ready))
