"""The MONAI Label app (monailabel_app/): a real `monailabel start_server` on 2 synthetic MSD cases.

The server serves a bundle_root copy whose models/model.pt is an untrained network built from
inference.json + quick.json (the app gets the same configs through --conf bundle_configs).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "monailabel_app"
VENV_BIN = Path(sys.executable).parent
CONFIGS = "inference.json,quick.json"
OVERRIDES = {"use_crf": True}  # the bundle default, explicit: the app runs the CRF of inference.json
MODEL = "brats"
STARTUP_TIMEOUT = 120

sys.path.insert(0, str(APP))  # the app's own `lib` package, as the launcher does
from lib.infers.brats_bundle import BraTSBundleInfer, load_bundle_config  # noqa: E402

from custom.synthetic import write_dataset  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bundle_copy(root: Path, with_weights: bool) -> Path:
    shutil.copytree(REPO / "bundle" / "configs", root / "configs")
    (root / "models").mkdir(parents=True)
    if with_weights:
        parser = load_bundle_config(str(root), CONFIGS.split(","), OVERRIDES)
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    return root


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlapp")
    write_dataset(tmp / "msd", 2, seed=0, layout="msd", size="small")
    studies = tmp / "studies"
    studies.mkdir()
    for f in sorted((tmp / "msd" / "imagesTr").glob("*.nii.gz")):
        shutil.copy(f, studies / f.name)
    bundle_root = _bundle_copy(tmp / "bundle", with_weights=True)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    log = open(tmp / "server.log", "w")
    cmd = [
        str(VENV_BIN / "monailabel"), "start_server", "--app", str(APP), "--studies", str(studies),
        "--host", "127.0.0.1", "--port", str(port),
        "--conf", "models", MODEL, "--conf", "bundle_root", str(bundle_root),
        "--conf", "bundle_configs", CONFIGS, "--conf", "bundle_overrides", json.dumps(OVERRIDES, separators=(",", ":")),  # no spaces: the launcher re-splits `$*`
    ]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-4000:]}")
            try:
                _get_json(f"{url}/info/")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"server not up after {STARTUP_TIMEOUT} s:\n{(tmp / 'server.log').read_text()[-4000:]}")
                time.sleep(1)
        yield {"url": url, "studies": studies, "tmp": tmp, "log": tmp / "server.log"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # the launcher starts python as a child: stop the whole group
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        log.close()


def test_info_lists_model_and_labels(server):
    info = _get_json(f"{server['url']}/info/")
    assert MODEL in info["models"], info["models"].keys()
    m = info["models"][MODEL]
    assert m["labels"] == {"edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    assert m["type"] == "segmentation" and m["dimension"] == 3
    assert m["config"]["weights"] == "present"
    assert "NO WEIGHTS" not in m["description"]
    assert info["labels"] == ["edema", "non-enhancing tumor", "enhancing tumour"]


def test_infer_returns_label_map_in_image_grid(server):
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server["url"], tmpdir=str(server["tmp"] / "client"))
    image = nib.load(server["studies"] / "BRATS_001.nii.gz")
    out_file, params = client.infer(MODEL, "BRATS_001", {})
    assert out_file and os.path.isfile(out_file), params
    if not out_file.endswith(".nii.gz"):  # the client names the file after the multipart field
        os.rename(out_file, out_file + ".nii.gz")
        out_file += ".nii.gz"
    out = nib.load(out_file)
    arr = np.asarray(out.dataobj)
    assert out.shape == image.shape[:3]
    np.testing.assert_allclose(out.affine, image.affine, atol=1e-4)
    assert arr.dtype == np.uint8
    assert set(np.unique(arr).tolist()) <= {0, 1, 2, 3}
    label_names = params if isinstance(params, dict) else json.loads(params)
    assert label_names.get("label_names") == {"edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    assert "DenseCRFd" in server["log"].read_text()  # the bundle's CRF step ran inside the server
    voxel_ml = abs(np.linalg.det(out.affine[:3, :3])) / 1000
    expected = {"TC": np.isin(arr, (2, 3)).sum() * voxel_ml, "WT": np.isin(arr, (1, 2, 3)).sum() * voxel_ml, "ET": (arr == 3).sum() * voxel_ml}
    assert label_names["volumes_ml"] == pytest.approx(expected)


def test_datastore_label_roundtrip(server):
    from monailabel.client import MONAILabelClient

    (server["tmp"] / "client2").mkdir(exist_ok=True)  # download_label needs an existing tmpdir
    client = MONAILabelClient(server["url"], tmpdir=str(server["tmp"] / "client2"))
    image = nib.load(server["studies"] / "BRATS_002.nii.gz")
    label = np.zeros(image.shape[:3], np.uint8)
    label[40:50, 40:50, 20:30] = 1
    label[43:47, 43:47, 23:27] = 3
    src = server["tmp"] / "upload.nii.gz"
    nib.save(nib.Nifti1Image(label, image.affine), src)
    res = client.save_label("BRATS_002", str(src), tag="final")
    assert res.get("image") == "BRATS_002", res
    ds = client.datastore()
    assert "final" in ds["objects"]["BRATS_002"]["labels"], ds["objects"]["BRATS_002"]
    back = client.download_label(res["label"], "final")
    got = nib.load(back)
    np.testing.assert_array_equal(np.asarray(got.dataobj), label)
    np.testing.assert_allclose(got.affine, image.affine, atol=1e-4)


def test_without_weights_listed_but_refuses(tmp_path):
    from monailabel.interfaces.exception import MONAILabelException

    root = _bundle_copy(tmp_path / "bundle", with_weights=False)
    task = BraTSBundleInfer(str(root), CONFIGS.split(","), OVERRIDES)
    assert task.is_valid()
    layout = task.parser.get_parsed_content("layout")  # MSD channel order, not the dataset detection
    assert layout.name == "msd" and tuple(layout.channel_index) == (1, 2, 3, 0)
    info = task.info()
    assert info["config"]["weights"] == "missing" and info["description"].startswith("NO WEIGHTS")
    with pytest.raises(MONAILabelException, match="No model weights"):
        task._get_network("cpu", {})
