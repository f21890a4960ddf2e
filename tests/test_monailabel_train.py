"""The MONAI Label train task (monailabel_app/lib/trainers): direct calls on a LocalDatastore of
synthetic 4D MSD studies, running the bundle's own train.json (+ quick.json, tiny sizes) in-process
and under torchrun (2 gloo processes)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from monailabel.datastore.local import LocalDatastore  # noqa: E402

from custom.synthetic import write_dataset  # noqa: E402
from devtools import REPO
from lib.trainers import BraTSBundleTrain  # noqa: E402

CONFIGS = ["train.json", "quick.json"]
# tests/test_bundle.py's TINY settings, and the datastore's 4D MSD studies
TINY = {"spacing": [5.0, 5.0, 5.0], "roi_size": [64, 32, 32], "feature_size": 12, "depths": [1, 1, 1, 1], "num_workers": 0,
        "num_samples": 1, "warmup_epochs": 1, "val_interval": 1, "iterations_per_epoch": None, "layout": "$brats.LAYOUTS['msd']"}


def _studies(root: Path, src: Path, labelled: int) -> LocalDatastore:
    (root / "labels" / "final").mkdir(parents=True)
    for i, image in enumerate(sorted((src / "imagesTr").glob("*.nii.gz"))):
        shutil.copy(image, root / image.name)
        if i < labelled:
            shutil.copy(src / "labelsTr" / image.name, root / "labels" / "final" / image.name)
    return LocalDatastore(str(root), extensions=("*.nii.gz", "*.nii"), auto_reload=False)


@pytest.fixture(scope="module")
def msd(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("msd")
    write_dataset(src, 4, seed=0, layout="msd", size="small")
    return src


@pytest.fixture(scope="module")
def datastore(msd, tmp_path_factory) -> LocalDatastore:
    return _studies(tmp_path_factory.mktemp("studies") / "studies", msd, labelled=4)


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    shutil.copytree(REPO / "bundle" / "configs", root / "configs")
    return root


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _state(path: Path) -> dict:
    """The state dict of a model.pt written by training (``{"model": state dict, "network": settings}``)."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_options_and_info(bundle_root):
    task = BraTSBundleTrain(str(bundle_root), CONFIGS, TINY)
    info = task.info()
    assert info["version"] == json.loads((REPO / "bundle" / "configs" / "metadata.json").read_text())["version"]
    options = info["config"]
    assert options["max_epochs"] == 10 and options["val_split"] == 0.2 and options["pretrained"] is True
    assert options["iterations_per_epoch"] is None  # TINY: one pass; quick.json as shipped: 32
    assert BraTSBundleTrain(str(bundle_root), CONFIGS).config()["iterations_per_epoch"] == 32
    assert options["num_processes"] == 2 and options["multi_gpu"] is (torch.cuda.device_count() > 1)
    assert {"device", "gpus", "tracking", "tracking_uri", "tracking_experiment_name"} <= set(options)
    assert task.model_path == str(bundle_root / "models" / "model.pt")


def test_single_process_run_writes_weights_and_mlflow_run(datastore, bundle_root, tmp_path):
    import mlflow

    model = bundle_root / "models" / "model.pt"
    assert not model.exists()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    task = BraTSBundleTrain(str(bundle_root), CONFIGS, TINY)
    result = task({"model": "brats", "max_epochs": 1, "iterations_per_epoch": 4, "tracking": "mlflow", "tracking_uri": uri,
                   "tracking_run_name": "t1"}, datastore)
    assert result == {"model_path": str(model), "train": 3, "validation": 1, "epochs": 1, "iterations_per_epoch": 4, "multi_gpu": False,
                      "processes": 1}
    assert any(k.startswith("decoder1.attention_gate") for k in _state(model))  # the bundle's network
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("brats")  # default: the request's model name
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "t1" and runs[0].info.status == "FINISHED"
    assert {"train_loss", "train_loss_epoch", "val_mean_dice"} <= set(runs[0].data.metrics)
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 4  # 1 epoch of 4 iterations over 3 training cases
    assert runs[0].data.params["dataset_dir"] == os.path.realpath(datastore._datastore_path)
    assert runs[0].data.params["epochs"] == "1" and runs[0].data.params["iterations_per_epoch"] == "4"


@pytest.mark.parametrize("value, expected", [(6, 6), ("6", 6), (None, None), ("", None), ("null", None), ("absent", 32),
                                             (0, "must be an integer >= 1"), (-2, "must be an integer >= 1"),
                                             ("abc", "must be an integer >= 1"), (2.5, "must be an integer >= 1"),
                                             (True, "must be an integer >= 1")])
def test_iterations_per_epoch_request_is_validated_and_passed_to_the_bundle(datastore, bundle_root, monkeypatch, value, expected):
    runs = []
    monkeypatch.setattr("monai.bundle.run", lambda **kwargs: runs.append(kwargs))  # the overrides the run would get
    task = BraTSBundleTrain(str(bundle_root), CONFIGS, {k: v for k, v in TINY.items() if k != "iterations_per_epoch"})
    request = {"model": "brats", "max_epochs": 2, "tracking": "None", "pretrained": False}
    if value != "absent":
        request["iterations_per_epoch"] = value
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=f"iterations_per_epoch {expected}.*got {re.escape(repr(value))}"):
            task(request, datastore)
        assert not runs  # refused before any run
        return
    result = task(request, datastore)
    assert result["iterations_per_epoch"] == expected  # absent: quick.json's 32
    assert runs[0]["iterations_per_epoch"] == ("$None" if expected is None else expected)  # monai.bundle.run drops a None


def test_pretrained_starts_from_the_served_weights(datastore, bundle_root, capsys):
    model = bundle_root / "models" / "model.pt"
    before = _state(model)  # written by the previous test
    frozen = BraTSBundleTrain(str(bundle_root), CONFIGS, {**TINY, "learning_rate": 0.0})  # training leaves weights as loaded
    request = {"model": "brats", "max_epochs": 1, "tracking": "None"}
    frozen({**request, "pretrained": True}, datastore)
    assert f"Restored all variables from {model}" in capsys.readouterr().out
    trainer = torch.load(bundle_root / "models" / "resume_checkpoint_epoch=1.pt", weights_only=False)["trainer"]
    assert (trainer["epoch_length"], trainer["iteration"]) == (3, 3)  # TINY's iterations_per_epoch None: one pass over 3 cases
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # control: without pretrained the run starts from a fresh network, so the result differs
    frozen({**request, "pretrained": False}, datastore)
    assert "Restored all variables" not in capsys.readouterr().out
    fresh = _state(model)
    assert not all(torch.equal(before[k], fresh[k]) for k in before)


def test_fine_tuning_adds_the_bundle_fine_tune_recipe(datastore, bundle_root, monkeypatch):
    """Starting from the served weights merges ``fine_tune.json`` last (its epochs, iterations and
    learning rate, shown as the task's options); training from scratch does not."""
    assert (bundle_root / "models" / "model.pt").is_file()  # written by the previous tests
    recipe = json.loads((REPO / "bundle" / "configs" / "fine_tune.json").read_text())
    runs = []
    monkeypatch.setattr("monai.bundle.run", lambda **kwargs: runs.append(kwargs))
    task = BraTSBundleTrain(str(bundle_root), CONFIGS)
    assert (task.config()["max_epochs"], task.config()["iterations_per_epoch"]) == (recipe["epochs"], recipe["iterations_per_epoch"])
    result = task({"model": "brats", "tracking": "None"}, datastore)
    assert [os.path.basename(f) for f in runs[0]["config_file"]] == [*CONFIGS, "fine_tune.json"]
    assert (result["epochs"], result["iterations_per_epoch"]) == (recipe["epochs"], recipe["iterations_per_epoch"])
    task({"model": "brats", "tracking": "None", "pretrained": False}, datastore)
    assert [os.path.basename(f) for f in runs[1]["config_file"]] == CONFIGS
    assert runs[1]["epochs"] == 10 and runs[1]["iterations_per_epoch"] == 32  # quick.json's


def test_multi_process_run_with_torchrun_gloo(datastore, bundle_root, capfd, tmp_path):
    import mlflow

    model = bundle_root / "models" / "model.pt"
    before = _digest(model)
    temporary = set(glob.glob(os.path.join(tempfile.gettempdir(), "brats_train_*.json")))
    task = BraTSBundleTrain(str(bundle_root), CONFIGS, TINY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    request = {"model": "brats", "max_epochs": 1, "multi_gpu": True, "num_processes": 2, "tracking": "mlflow", "tracking_uri": uri,
               "tracking_experiment_name": "multi"}
    result = task(request, datastore)
    assert result["multi_gpu"] is True and result["processes"] == 2
    assert _digest(model) != before
    out = capfd.readouterr().out  # the children's output, streamed line by line
    assert out.count(f"Restored all variables from {model}") == 2  # pretrained: both ranks load the weights
    assert "Epoch: 1/1, Iter: 2/2" in out  # 3 training cases padded to 4 over 2 ranks
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "brats_train_*.json"))) == temporary
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("multi").experiment_id])
    assert len(runs) == 1 and "train_loss" in runs[0].data.metrics  # rank 0 only
    assert not list((bundle_root / "configs").glob("*monailabel*"))  # nothing written into the bundle's configs


def test_failing_runs_raise_readable_errors(datastore, bundle_root):
    bad = BraTSBundleTrain(str(bundle_root), CONFIGS, {**TINY, "network_def#_target_": "custom.networks.NoSuchNetwork"})
    request = {"model": "brats", "max_epochs": 1, "tracking": "None", "pretrained": False}
    with pytest.raises(Exception, match="NoSuchNetwork"):  # the in-process error itself
        bad(request, datastore)
    with pytest.raises(RuntimeError, match=r"(?s)torchrun exit code 1\): .*NoSuchNetwork.*--- last output ---"):
        bad({**request, "multi_gpu": True, "num_processes": 2}, datastore)
    with pytest.raises(ValueError, match="tracking"):
        BraTSBundleTrain(str(bundle_root), CONFIGS, TINY)({**request, "tracking": "wandb"}, datastore)


def test_fewer_than_two_labels_is_refused(msd, bundle_root, tmp_path):
    one = _studies(tmp_path / "studies", msd, labelled=1)
    assert len(one.datalist()) == 1
    with pytest.raises(ValueError, match="at least 2 labelled images"):
        BraTSBundleTrain(str(bundle_root), CONFIGS, TINY)({"model": "brats", "max_epochs": 1}, one)
