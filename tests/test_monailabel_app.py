"""The MONAI Label app (monailabel_app/) under a real `monailabel start_server` on loopback.

Two servers, each on a copy of the bundle whose models/model.pt is an untrained tiny network
(quick.json + TINY-style overrides, passed to the app with --conf): one on a flat folder of 4D MSD
NIfTI images, one on a BraTS 2021 layout folder (3 labelled + 2 unlabelled cases). Driven with
MONAI Label's own client and plain HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from custom.synthetic import write_dataset  # noqa: E402
from devtools import mlapp_server
from devtools.mlapp_server import APP, CONFIGS, MODEL, OVERRIDES, REPO  # noqa: F401
from lib.infers.brats_bundle import BraTSBundleInfer  # noqa: E402


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _bundle_copy(root: Path, with_weights: bool) -> Path:
    return mlapp_server.bundle_copy(root, with_weights)


def _start_server(tmp: Path, studies: Path):
    bundle_root = _bundle_copy(tmp / "bundle", with_weights=True)
    try:
        proc, server = mlapp_server.launch(tmp, studies, bundle_root)
    except mlapp_server.ServerError as e:
        pytest.fail(str(e))
    return proc, open(os.devnull), server  # (the log file is the server's, written by its own process)


def _stop(proc):
    mlapp_server.stop(proc)


@pytest.fixture(scope="module")
def msd_server(tmp_path_factory):
    """Flat folder of three 4D MSD images, no labels."""
    tmp = tmp_path_factory.mktemp("mlapp_msd")
    write_dataset(tmp / "msd", 3, seed=0, layout="msd", size="small")
    studies = tmp / "studies"
    studies.mkdir()
    for f in sorted((tmp / "msd" / "imagesTr").glob("*.nii.gz")):
        shutil.copy(f, studies / f.name)
    proc, log, server = _start_server(tmp, studies)
    try:
        yield server
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def brats_server(tmp_path_factory):
    """BraTS 2021 layout: five case folders, the last two without a segmentation file; the last one
    has only FLAIR and T1ce (issue #13: cases with missing sequences)."""
    tmp = tmp_path_factory.mktemp("mlapp_brats")
    studies = tmp / "brats"
    write_dataset(studies, 5, seed=0, layout="brats2021", size="small", unlabelled=2)
    for m in ("t1", "t2"):
        (studies / PARTIAL / f"{PARTIAL}_{m}.nii.gz").unlink()
    originals = {p: _sha(p) for p in studies.rglob("*.nii.gz")}
    proc, log, server = _start_server(tmp, studies)
    try:
        yield {**server, "originals": originals}
    finally:
        _stop(proc)
        log.close()
    for path, digest in originals.items():  # the dataset itself is never written
        assert _sha(path) == digest, path


PARTIAL = "BraTS2021_00004"  # only FLAIR and T1ce


def _client(server, name):
    from monailabel.client import MONAILabelClient

    d = server["tmp"] / name
    d.mkdir(exist_ok=True)
    return MONAILabelClient(server["url"], tmpdir=str(d))


def _infer(server, image_id, params=None):
    """POST /infer/brats -> (array, affine, result json)."""
    r = requests.post(f"{server['url']}/infer/{MODEL}", params={"image": image_id, "output": "all"}, data={"params": json.dumps(params or {})}, timeout=600)
    assert r.status_code == 200, r.text
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    parts = {}
    for part in MultipartDecoder.from_response(r).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        name = disposition.split('name="')[1].split('"')[0]
        parts[name] = part.content
    out = server["tmp"] / f"result_{time.monotonic_ns()}.nii.gz"
    out.write_bytes(parts["image"])
    img = nib.load(out)
    return np.asarray(img.dataobj), img.affine, json.loads(parts["params"])


def _label_like(image_path, values=(0, 1), dtype=np.uint8, shape=None, affine=None):
    img = nib.load(image_path)
    label = np.zeros(shape or img.shape[:3], dtype)
    label[10:20, 10:20, 10:20] = values[1]
    return nib.Nifti1Image(label, img.affine if affine is None else affine)


def _put_label(server, image_id, path, tag="final"):
    with open(path, "rb") as f:
        return requests.put(f"{server['url']}/datastore/label", params={"image": image_id, "tag": tag}, files={"label": (os.path.basename(path), f)}, timeout=60)


# ---------------------------------------------------------------- flat folder of 4D NIfTI images


def test_info_lists_model_labels_colours_and_tasks(msd_server):
    info = requests.get(f"{msd_server['url']}/info/", timeout=10).json()
    m = info["models"][MODEL]
    assert m["labels"] == {"edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    assert set(m["label_colors"]) == set(m["labels"]) and all(len(c) == 3 for c in m["label_colors"].values())
    assert m["type"] == "segmentation" and m["dimension"] == 3
    assert m["config"]["crf"] is True  # the options 3D Slicer shows (plus MONAI Label's `device`)
    assert m["bundle"]["weights"] == "present" and "NO WEIGHTS" not in m["description"]
    assert info["labels"] == ["edema", "non-enhancing tumor", "enhancing tumour"]
    assert MODEL in info["trainers"] and {"max_epochs", "val_split", "multi_gpu", "tracking"} <= set(info["trainers"][MODEL]["config"])
    assert {"random", "first", "epistemic"} <= set(info["strategies"])
    assert "epistemic" in info["scoring"]


def test_infer_4d_study_label_map_in_image_grid_with_crf_switch(msd_server):
    client = _client(msd_server, "client_infer")
    image = nib.load(msd_server["studies"] / "BRATS_001.nii.gz")
    out_file, params = client.infer(MODEL, "BRATS_001", {})
    assert out_file and os.path.isfile(out_file), params
    out = nib.load(out_file) if out_file.endswith(".nii.gz") else nib.Nifti1Image.from_bytes(Path(out_file).read_bytes())
    arr = np.asarray(out.dataobj)
    assert out.shape == image.shape[:3]
    np.testing.assert_allclose(out.affine, image.affine, atol=1e-4)
    assert arr.dtype == np.uint8 and set(np.unique(arr).tolist()) <= {0, 1, 2, 3}
    result = params if isinstance(params, dict) else json.loads(params)
    assert result["label_names"] == {"edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    assert result["crf"] is True
    voxel_ml = abs(np.linalg.det(out.affine[:3, :3])) / 1000
    expected = {"TC": np.isin(arr, (2, 3)).sum() * voxel_ml, "WT": np.isin(arr, (1, 2, 3)).sum() * voxel_ml, "ET": (arr == 3).sum() * voxel_ml}
    assert result["volumes_ml"] == pytest.approx(expected)

    crf_runs = msd_server["log"].read_text().count("DenseCRFd")
    assert crf_runs >= 1  # the bundle's CRF step ran inside the server
    arr2, affine2, result2 = _infer(msd_server, "BRATS_001", {"crf": False})
    assert result2["crf"] is False and arr2.shape == arr.shape
    assert msd_server["log"].read_text().count("DenseCRFd") == crf_runs  # ... and not when switched off


def test_infer_uncertainty_map(msd_server):
    image = nib.load(msd_server["studies"] / "BRATS_002.nii.gz")
    arr, affine, result = _infer(msd_server, "BRATS_002", {"uncertainty": True, "mc_samples": 4, "crf": False})
    assert arr.shape == image.shape[:3] and arr.dtype == np.float32
    np.testing.assert_allclose(affine, image.affine, atol=1e-4)
    assert np.isfinite(arr).all() and arr.min() >= 0 and arr.max() > 0
    assert arr.max() <= 3 * np.log(2) + 1e-4  # mutual information of 3 binary regions, nats
    u = result["uncertainty"]
    assert u["mc_samples"] == 4 and u["mean"] == pytest.approx(float(arr.mean()), rel=1e-4, abs=1e-6)
    r = requests.post(f"{msd_server['url']}/infer/{MODEL}", params={"image": "BRATS_002"}, data={"params": json.dumps({"uncertainty": True, "mc_samples": 1000})}, timeout=60)
    assert r.status_code >= 400


def test_datastore_label_roundtrip_is_atomic(msd_server):
    client = _client(msd_server, "client_label")
    image_path = msd_server["studies"] / "BRATS_002.nii.gz"
    src = msd_server["tmp"] / "upload.nii.gz"
    label = _label_like(image_path, values=(0, 3))
    nib.save(label, src)
    res = client.save_label("BRATS_002", str(src), tag="final")
    assert res.get("image") == "BRATS_002", res
    assert "final" in client.datastore()["objects"]["BRATS_002"]["labels"]
    got = nib.load(client.download_label(res["label"], "final"))
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(label.dataobj))
    np.testing.assert_allclose(got.affine, label.affine, atol=1e-4)
    leftovers = [p.name for p in (msd_server["studies"] / "labels").rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def test_bad_labels_and_ids_are_refused_with_4xx(msd_server):
    url, studies, tmp = msd_server["url"], msd_server["studies"], msd_server["tmp"]
    image_path = studies / "BRATS_003.nii.gz"
    good = tmp / "good.nii.gz"
    nib.save(_label_like(image_path), good)
    assert _put_label(msd_server, "BRATS_003", good).status_code == 200
    stored = studies / "labels" / "final" / "BRATS_003.nii.gz"
    before = _sha(stored)

    shape = nib.load(image_path).shape[:3]
    affine = nib.load(image_path).affine
    shifted = affine.copy()
    shifted[0, 3] += 5
    cases = {
        "wrong_shape.nii.gz": (_label_like(image_path, shape=(shape[0] + 1, shape[1], shape[2])), 422, "shape"),
        "wrong_affine.nii.gz": (_label_like(image_path, affine=shifted), 422, "affine"),
        "wrong_values.nii.gz": (_label_like(image_path, values=(0, 4)), 422, "[4]"),
        "fractional.nii.gz": (_label_like(image_path, values=(0, 0.5), dtype=np.float32), 422, "integer"),
        "four_d.nii.gz": (nib.Nifti1Image(np.zeros((*shape, 2), np.uint8), affine), 422, "3D"),
    }
    for name, (img, status, words) in cases.items():
        nib.save(img, tmp / name)
        r = _put_label(msd_server, "BRATS_003", tmp / name)
        assert r.status_code == status and words in r.text, (name, r.status_code, r.text)
    (tmp / "not_nifti.nii.gz").write_bytes(b"this is not a NIfTI file" * 10)
    r = _put_label(msd_server, "BRATS_003", tmp / "not_nifti.nii.gz")
    assert r.status_code == 415 and "NIfTI" in r.text, r.text
    r = _put_label(msd_server, "BRATS_003", good, tag="../../escape")
    assert r.status_code == 400, r.text
    assert _sha(stored) == before  # refused uploads leave the stored label alone

    assert _put_label(msd_server, "NO_SUCH_IMAGE", good).status_code == 404
    for bad in ("../BRATS_001", "/etc/passwd", "a/b", ".hidden"):
        assert _put_label(msd_server, bad, good).status_code == 400, bad
    r = requests.post(f"{url}/infer/{MODEL}", params={"image": "NO_SUCH_IMAGE"}, timeout=60)
    assert r.status_code == 404 and "NO_SUCH_IMAGE" in r.text
    r = requests.post(f"{url}/infer/{MODEL}", params={"image": str(image_path)}, timeout=60)  # server paths are not ids
    assert r.status_code == 400
    assert requests.delete(f"{url}/datastore/image", params={"id": "BRATS_001"}, timeout=60).status_code == 403
    assert (studies / "BRATS_001.nii.gz").is_file()
    assert requests.get(f"{url}/info/", timeout=10).status_code == 200  # the server is still up


def _save_wide_weights(bundle_root: Path, path: Path) -> None:
    """Weights of the served configs at feature_size 24 (the server's: 12), with their settings, written atomically at ``path``."""
    import torch

    from custom.handlers.checkpoints import NetworkRecord
    from lib.bundle_config import load_bundle_config

    parser = load_bundle_config(str(bundle_root), CONFIGS.split(","), {**OVERRIDES, "feature_size": 24})
    network = parser.get_parsed_content("network_def")
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": network.state_dict(), "network": NetworkRecord(network, parser.get_parsed_content("network_settings")).state_dict()}, tmp)
    os.replace(tmp, path)


WIDE = "weights of SwinUNETRAttSE feature_size 24 do not fit the configured network SwinUNETRAttSE feature_size 12"


def test_weights_that_do_not_fit_are_a_503_naming_both(msd_server, tmp_path):
    """Served weights replaced by weights of another width: /info says so and /infer answers 503 with the reason;
    the original weights serve again once put back."""
    url, model = msd_server["url"], msd_server["bundle"] / "models" / "model.pt"
    shutil.copy2(model, tmp_path / "model.pt")
    _save_wide_weights(msd_server["bundle"], model)
    try:
        r = requests.post(f"{url}/infer/{MODEL}", params={"image": "BRATS_001"}, timeout=60)
        assert r.status_code == 503 and r.json()["detail"].startswith(f"{model}: {WIDE}"), r.text
        assert requests.get(f"{url}/info/", timeout=10).json()["models"][MODEL]["bundle"]["weights"] == "do not fit"
    finally:
        shutil.copy2(tmp_path / "model.pt", tmp_path / "restore.pt")
        os.replace(tmp_path / "restore.pt", model)
    assert requests.get(f"{url}/info/", timeout=10).json()["models"][MODEL]["bundle"]["weights"] == "present"


def test_eight_concurrent_inference_requests_all_succeed(msd_server):
    def one(i):
        return _infer(msd_server, f"BRATS_00{1 + i % 3}", {"crf": i % 2 == 0})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for i, (arr, affine, result) in enumerate(results):
        assert arr.shape == nib.load(msd_server["studies"] / f"BRATS_00{1 + i % 3}.nii.gz").shape[:3]
        assert result["crf"] is (i % 2 == 0)


# ---------------------------------------------------------------- BraTS 2021 layout folder


def test_brats_layout_datastore(brats_server):
    url, studies = brats_server["url"], brats_server["studies"]
    ds = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=10).json()["objects"]
    assert sorted(ds) == [f"BraTS2021_0000{i}" for i in range(5)]
    labelled = sorted(i for i, o in ds.items() if "final" in o["labels"])
    assert labelled == [f"BraTS2021_0000{i}" for i in range(3)]  # the segmentation files count as final labels
    case = "BraTS2021_00000"
    r = requests.get(f"{url}/datastore/image", params={"image": case}, timeout=60)
    assert r.status_code == 200 and r.content == (studies / case / f"{case}_flair.nii.gz").read_bytes()  # what Slicer opens
    r = requests.get(f"{url}/datastore/label", params={"label": case, "tag": "final"}, timeout=60)
    assert r.status_code == 200 and r.content == (studies / case / f"{case}_seg.nii.gz").read_bytes()

    flair = studies / case / f"{case}_flair.nii.gz"
    new = brats_server["tmp"] / "corrected.nii.gz"
    nib.save(_label_like(flair, values=(0, 4)), new)
    bad = brats_server["tmp"] / "msd_values.nii.gz"
    nib.save(_label_like(flair, values=(0, 3)), bad)  # 3 is not a BraTS 2021 label
    assert _put_label(brats_server, case, bad).status_code == 422
    assert _put_label(brats_server, case, new).status_code == 200
    saved = studies / "labels" / "final" / f"{case}.nii.gz"
    assert saved.is_file() and _sha(saved) == _sha(new)
    r = requests.get(f"{url}/datastore/label", params={"label": case, "tag": "final"}, timeout=60)
    assert r.content == saved.read_bytes()  # the saved label now wins over the segmentation file
    assert _sha(studies / case / f"{case}_seg.nii.gz") == brats_server["originals"][studies / case / f"{case}_seg.nii.gz"]
    assert requests.delete(f"{url}/datastore/image", params={"id": case}, timeout=60).status_code == 403


def test_slicer_segment_indices_are_mapped_to_label_values(brats_server):
    """3D Slicer's module uploads segment positions 1..N plus `label_info` names (BraTS 2021 ET is 4, not 3)."""
    case = "BraTS2021_00001"
    flair = nib.load(brats_server["studies"] / case / f"{case}_flair.nii.gz")
    exported = np.zeros(flair.shape, np.uint8)
    exported[10:20, 10:20, 10:20] = 1  # necrotic core
    exported[20:25, 10:20, 10:20] = 2  # oedema
    exported[25:30, 10:20, 10:20] = 3  # enhancing: Slicer's 3rd segment
    path = brats_server["tmp"] / "slicer_export.nii.gz"
    nib.save(nib.Nifti1Image(exported, flair.affine), path)
    segments = [{"name": "necrotic tumour core", "idx": 1}, {"name": "peritumoral oedema", "idx": 2}, {"name": "enhancing tumour", "idx": 3}]

    def put(info):
        with open(path, "rb") as f:
            return requests.put(f"{brats_server['url']}/datastore/label", params={"image": case, "tag": "final"},
                                data={"params": json.dumps({"label_info": info})}, files={"label": (path.name, f)}, timeout=60)

    assert put([{"name": "Segment_1", "idx": 1}, *segments[1:]]).status_code == 422  # not a label name
    assert put(segments[:2]).status_code == 422  # value 3 unaccounted for
    assert put(segments).status_code == 200
    stored = np.asarray(nib.load(brats_server["studies"] / "labels" / "final" / f"{case}.nii.gz").dataobj)
    expected = np.where(exported == 3, 4, exported)
    np.testing.assert_array_equal(stored, expected)


def test_brats_layout_infer_uses_all_four_modalities(brats_server):
    info = requests.get(f"{brats_server['url']}/info/", timeout=10).json()
    labels = info["models"][MODEL]["labels"]
    assert labels == {"necrotic tumour core": 1, "peritumoral oedema": 2, "enhancing tumour": 4}
    case = "BraTS2021_00003"
    flair = nib.load(brats_server["studies"] / case / f"{case}_flair.nii.gz")
    arr, affine, result = _infer(brats_server, case, {"crf": False})
    assert arr.shape == flair.shape and arr.dtype == np.uint8
    np.testing.assert_allclose(affine, flair.affine, atol=1e-4)
    assert set(np.unique(arr).tolist()) <= {0, 1, 2, 4}
    assert result["label_names"] == labels
    assert result["sequences"] == ["t1", "t1ce", "t2", "flair"]


def test_brats_layout_case_with_only_flair_and_t1ce_is_listed_and_segmented(brats_server):
    """Issue #13: the case is listed, clients get its FLAIR, inference zero-fills T1 and T2 and says so."""
    url, studies = brats_server["url"], brats_server["studies"]
    flair = studies / PARTIAL / f"{PARTIAL}_flair.nii.gz"
    info = requests.get(f"{url}/datastore/image/info", params={"image": PARTIAL}, timeout=10).json()
    assert info["sequences"] == ["t1ce", "flair"] and info["path"] == str(flair)
    r = requests.get(f"{url}/datastore/image", params={"image": PARTIAL}, timeout=60)
    assert r.status_code == 200 and r.content == flair.read_bytes()
    arr, affine, result = _infer(brats_server, PARTIAL, {"crf": False})
    assert result["sequences"] == ["t1ce", "flair"]
    ref = nib.load(flair)
    assert arr.shape == ref.shape and arr.dtype == np.uint8
    np.testing.assert_allclose(affine, ref.affine, atol=1e-4)
    assert set(np.unique(arr).tolist()) <= {0, 1, 2, 4}
    # a client cannot claim other sequences: the datastore sets them
    _, _, forced = _infer(brats_server, PARTIAL, {"crf": False, "sequences": ["t1", "t1ce", "t2", "flair"]})
    assert forced["sequences"] == ["t1ce", "flair"]


def test_epistemic_scoring_then_active_learning(brats_server):
    url = brats_server["url"]
    r = requests.post(f"{url}/scoring/epistemic", params={"run_sync": "true"}, json={}, timeout=600)
    assert r.status_code == 200, r.text
    unlabelled = ["BraTS2021_00003", "BraTS2021_00004"]
    scores = {}
    for image_id in unlabelled:
        info = requests.get(f"{url}/datastore/image/info", params={"image": image_id}, timeout=10).json()
        assert info["epistemic_samples"] == 4 and info["epistemic_entropy"] > 0, info
        scores[image_id] = info["epistemic_entropy"]
    labelled_info = requests.get(f"{url}/datastore/image/info", params={"image": "BraTS2021_00001"}, timeout=10).json()
    assert "epistemic_entropy" not in labelled_info  # only unlabelled images are scored

    r = requests.post(f"{url}/activelearning/epistemic", json={}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == max(scores, key=scores.get)
    for strategy in ("random", "first"):
        r = requests.post(f"{url}/activelearning/{strategy}", json={}, timeout=60)
        assert r.status_code == 200 and r.json()["id"] in unlabelled, r.text


def _wait_for_training(url, timeout=900):
    """Poll GET /train/ (the latest training task) until it is neither SUBMITTED nor RUNNING."""
    deadline = time.monotonic() + timeout
    while True:
        status = requests.get(f"{url}/train/", timeout=30).json()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            return status
        assert time.monotonic() < deadline, f"training did not finish: {status}"
        time.sleep(2)


def test_training_changes_the_served_weights(brats_server):
    """POST /train in one process (the torchrun path of the same task: tests/test_monailabel_train.py)."""
    url = brats_server["url"]
    model_pt = brats_server["bundle"] / "models" / "model.pt"
    case = "BraTS2021_00004"
    _, _, before = _infer(brats_server, case, {"crf": False})
    digest = _sha(model_pt)
    tracking_uri = f"sqlite:///{brats_server['tmp'] / 'mlflow.db'}"
    request = {"max_epochs": 1, "val_split": 0.34, "tracking": "mlflow", "tracking_uri": tracking_uri,
               "tracking_experiment_name": "app-tests"}
    r = requests.post(f"{url}/train/{MODEL}", json=request, timeout=60)
    assert r.status_code == 200, r.text
    status = _wait_for_training(url)
    assert status["status"] == "DONE" and status["details"], status  # details: the last output lines of the run
    assert _sha(model_pt) != digest  # new best model written by the bundle's own saver
    _, _, after = _infer(brats_server, case, {"crf": False})
    assert after["weights_mtime"] != before["weights_mtime"]  # the inference task reloaded them

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("app-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert runs and any("train_loss" in run.data.metrics for run in runs)


def test_without_weights_listed_but_refuses(tmp_path):
    from monailabel.interfaces.exception import MONAILabelException

    root = _bundle_copy(tmp_path / "bundle", with_weights=False)
    task = BraTSBundleInfer(str(root), CONFIGS.split(","), OVERRIDES)
    assert task.is_valid()
    layout = task.parser.get_parsed_content("layout")  # MSD channel order, not the dataset detection
    assert layout.name == "msd" and tuple(layout.channel_index) == (1, 2, 3, 0)
    info = task.info()
    assert info["bundle"]["weights"] == "missing" and info["description"].startswith("NO WEIGHTS")
    with pytest.raises(MONAILabelException, match="No model weights"):
        task._get_network("cpu", {})


def test_weights_that_do_not_fit_are_flagged_at_start_and_refused(tmp_path):
    from fastapi import HTTPException

    root = _bundle_copy(tmp_path / "bundle", with_weights=False)
    model = root / "models" / "model.pt"
    _save_wide_weights(root, model)
    task = BraTSBundleInfer(str(root), CONFIGS.split(","), OVERRIDES)
    info = task.info()
    assert info["bundle"]["weights"] == "do not fit" and info["description"].startswith(f"WEIGHTS DO NOT FIT: {model}: {WIDE}")
    with pytest.raises(HTTPException) as e:
        task._get_network("cpu", {})
    assert e.value.status_code == 503 and e.value.detail.startswith(f"{model}: {WIDE} (set feature_size to the weights' values")
    shutil.rmtree(root / "models")
    _bundle_copy(tmp_path / "fitting", with_weights=True)
    shutil.copytree(tmp_path / "fitting" / "models", root / "models")  # weights of the served width (a bare state dict)
    assert task._get_network("cpu", {}) is not None and task.info()["bundle"]["weights"] == "present"


def test_segment_map_refuses_background_index_and_shared_indices():
    """Slicer's ``label_info``: an entry mapping index 0 (background) or reusing an index is a 422, not a silent relabel."""
    from fastapi import HTTPException

    from custom.data import CONVENTIONS
    from lib.datastore.brats import remap_segments

    conv = CONVENTIONS["brats2021"]
    data = np.zeros((4, 4, 4), np.uint8)
    data[1, 1, 1], data[2, 2, 2] = 1, 2
    ok = remap_segments(data, [{"name": conv.names[4], "idx": 1}, {"name": conv.names[2], "idx": 2}], conv, "label")
    assert ok[1, 1, 1] == 4 and ok[2, 2, 2] == 2 and (ok == 0).sum() == 62
    for bad in ([{"name": conv.names[4], "idx": 0}, {"name": conv.names[2], "idx": 2}, {"name": conv.names[1], "idx": 1}],
                [{"name": conv.names[4], "idx": 1}, {"name": conv.names[2], "idx": 1}],
                [{"name": conv.names[4], "idx": True}, {"name": conv.names[2], "idx": 2}],
                [{"name": conv.names[4], "idx": -1}, {"name": conv.names[2], "idx": 2}, {"name": conv.names[1], "idx": 1}]):
        with pytest.raises(HTTPException) as e:
            remap_segments(data, bad, conv, "label")
        assert e.value.status_code == 422 and "0 is background" in e.value.detail
