"""MLflow tracking against a real MLflow server on loopback, and training that survives a dead one."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
import requests
from conftest import PYTHON, REPO, run_env
from test_bundle import TINY, configs

from custom.synthetic import write_dataset

TRAIN_ARGS = ["run", "training", "--config_file", configs("train.json", "quick.json"), "--epochs", "1", *TINY, "--tracking", "mlflow"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking_data")
    write_dataset(root, 4, seed=5, layout="brats2023", size="small")
    return root


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], cwd=root, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, "mlflow server exited"
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_training(dataset, bundle_root, *extra, env=None):
    return subprocess.run([PYTHON, "-m", "monai.bundle", *TRAIN_ARGS, "--dataset_dir", str(dataset), "--bundle_root", str(bundle_root),
                           *extra], cwd=REPO, env=env or run_env(), capture_output=True, text=True, timeout=600)


def test_training_is_recorded_on_a_real_mlflow_server(dataset, mlflow_server, tmp_path):
    import mlflow

    proc = run_training(dataset, tmp_path, "--tracking_uri", mlflow_server, "--experiment_name", "server_test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("server_test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["network.class"] == "SwinUNETRAttSE" and run.data.params["layout"] == "brats2023"
    assert {"train_loss", "val_mean_dice", "val_dice_tc", "val_dice_wt", "val_dice_et"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "validation_overlay.png" in artifacts
    assert not (tmp_path / "eval" / "mlruns.db").exists()  # nothing went to the local default store


def test_unreachable_tracking_server_does_not_stop_training(dataset, tmp_path):
    env = run_env()
    env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    proc = run_training(dataset, tmp_path, "--tracking_uri", f"http://127.0.0.1:{free_port()}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MLflow tracking failed" in proc.stdout + proc.stderr
    assert (tmp_path / "models" / "model.pt").is_file()


def test_run_name_is_reused_only_when_resuming(tmp_path):
    from custom.handlers.tracking import RUN_NAME_FILE, run_name

    first = run_name(tmp_path)
    assert (tmp_path / RUN_NAME_FILE).read_text().strip() == first
    assert run_name(tmp_path, resume_path=str(tmp_path / "resume_checkpoint_epoch=2.pt")) == first  # resumed: same run
    evaluation = run_name(tmp_path, None, save=False)
    assert evaluation != first and (tmp_path / RUN_NAME_FILE).read_text().strip() == first  # evaluation: own run, name kept
    fresh = run_name(tmp_path)
    assert fresh != first and (tmp_path / RUN_NAME_FILE).read_text().strip() == fresh  # a new training: a new run
