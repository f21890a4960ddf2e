"""The shipped weights (bundle/models/model.pt): recorded, loadable, and segmenting generated cases
through the bundle's own ``inference.json`` with all four sequences and with FLAIR + T1ce only."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from custom.synthetic import write_dataset
from devtools import REPO

MODELS = REPO / "bundle" / "models"
RECORD = MODELS / "model.json"
INFERENCE = REPO / "bundle" / "configs" / "inference.json"


def _record() -> dict:
    return json.loads(RECORD.read_text())


def _parser() -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    return parser


def test_file_matches_its_record():
    record = _record()
    path = MODELS / record["file"]
    assert path.name == "model.pt" and path.stat().st_size == record["size_bytes"]
    assert record["size_bytes"] < 60 * 2**20
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    assert record["command"] and record["dtype"] == "float16"


def test_architecture_matches_inference_json_defaults():
    record, parser = _record(), _parser()
    checkpoint = torch.load(MODELS / "model.pt", map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint)  # {"model", "network"} as tools/export_weights.py writes it, or a bare state dict
    assert checkpoint.get("network", record["network"]) == record["network"]
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(state, strict=True)  # every tensor present, every shape equal
    assert record["network"]["_target_"] == parser["network_def"]["_target_"]
    assert set(record["network"]) == {"_target_", *parser["network_settings"]}  # every setting the loader compares is recorded
    for key, value in record["network"].items():
        if key != "_target_":
            assert parser[key] == value, f"inference.json {key} = {parser[key]!r}, the shipped weights were trained with {value!r}"
    assert record["parameters"] == sum(p.numel() for p in network.parameters())


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Two generated held-out cases (a seed the shipped model never saw), 2 mm grid, BraTS 2021 layout,
    and a copy of the same cases with only FLAIR and T1ce."""
    root = tmp_path_factory.mktemp("shipped")
    full, two = root / "full", root / "flair_t1ce"
    write_dataset(full, 2, seed=99, layout="brats2021", size="medium")
    for case in sorted(full.iterdir()):
        (two / case.name).mkdir(parents=True)
        for f in case.iterdir():
            if f.name.endswith(("_flair.nii.gz", "_t1ce.nii.gz")):
                (two / case.name / f.name).symlink_to(f)
    return root


def _infer(dataset: Path, out: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The README's inference command, run from ``cwd`` with paths relative to it."""
    configs = Path(os.path.relpath(INFERENCE.parent, cwd))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(configs / "inference.json"),
           "--logging_file", str(configs / "logging.conf"), "--dataset_dir", str(dataset), "--output_dir", str(out),
           "--use_crf", "false"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)


def _wt_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    p, r = pred > 0, ref > 0
    return 2.0 * float((p & r).sum()) / max(float(p.sum() + r.sum()), 1.0)


@pytest.mark.parametrize("sequences, cwd", [("full", REPO), ("flair_t1ce", REPO / "bundle")], ids=["full-from-repo", "flair_t1ce-from-bundle"])
def test_segments_generated_cases(generated, tmp_path, sequences, cwd):
    r = _infer(generated / sequences, tmp_path / "pred", cwd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    dices = []
    for case in sorted((generated / "full").iterdir()):
        pred_img = nib.load(tmp_path / "pred" / f"{case.name}.nii.gz")
        pred = np.asarray(pred_img.dataobj)
        ref = np.asarray(nib.load(case / f"{case.name}_seg.nii.gz").dataobj)
        assert pred.shape == ref.shape and pred_img.get_data_dtype() == np.uint8 and set(np.unique(pred).tolist()) <= {0, 1, 2, 4}
        expected = "t1,t1ce,t2,flair" if sequences == "full" else "t1ce,flair"
        assert pred_img.header["descrip"].tobytes().rstrip(b"\0").decode() == f"sequences: {expected}"
        dices.append(_wt_dice(pred, ref))
    assert np.mean(dices) > 0.6, f"whole-tumour Dice {dices}"


def test_elsewhere_without_bundle_root_names_the_missing_weights(generated, tmp_path):
    r = _infer(generated / "flair_t1ce", tmp_path / "pred", cwd=tmp_path)
    assert r.returncode != 0
    assert f"{tmp_path / 'models' / 'model.pt'}: no weights file there" in r.stderr and "--bundle_root" in r.stderr
    assert not (tmp_path / "pred").exists() or not any((tmp_path / "pred").iterdir())
