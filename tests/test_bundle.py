"""The MONAI bundle, run as a user runs it: `python -m monai.bundle ...` and torchrun subprocesses
on small synthetic BraTS data (tiny network and volumes so that the CPU copes)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO, run_env, write_toy_dataset

from custom.data import CONVENTIONS, MODALITIES, list_cases
from custom.metrics import HD95_ONE_EMPTY_MM, region_metrics
from custom.synthetic import write_dataset

CONFIGS = REPO / "bundle" / "configs"
TRAIN = str(CONFIGS / "train.json")
QUICK = str(CONFIGS / "quick.json")
# tiny settings on top of quick.json: 5 mm voxels, 64x32x32 windows, a one-block-per-stage network, one pass over the
# training cases an epoch (quick.json's fixed 32 iterations would make every run here 10 times longer; 0 as null, which
# the command line cannot pass: monai.bundle drops None arguments)
TINY = ["--spacing", "[5.0,5.0,5.0]", "--roi_size", "[64,32,32]", "--feature_size", "12", "--depths", "[1,1,1,1]",
        "--num_workers", "0", "--num_samples", "1", "--warmup_epochs", "1", "--val_interval", "1", "--num_folds", "3",
        "--iterations_per_epoch", "0"]

NET = TINY[4:8]


def configs(*names: str) -> str:
    return "[" + ",".join(f"'{CONFIGS / n}'" for n in names) + "]"


def bundle(*args: str, timeout: float = 600, check: bool = True, **popen) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "monai.bundle", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundle_data")
    out = {}
    for layout, n, unlabelled, seed in (("brats2021", 6, 1, 0), ("brats2023", 2, 1, 1), ("msd", 2, 1, 2)):
        out[layout] = root / layout
        write_dataset(out[layout], n, seed=seed, layout=layout, size="small", unlabelled=unlabelled)
    out["heldout"] = root / "heldout"
    write_dataset(out["heldout"], 2, seed=3, layout="brats2021", size="small")
    return out


@pytest.fixture(scope="session")
def trained(data, tmp_path_factory) -> Path:
    """A bundle root with a briefly trained tiny model, tracked in MLflow."""
    root = tmp_path_factory.mktemp("trained")
    bundle("run", "training", "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", configs("train.json", "quick.json"),
           "--logging_file", str(CONFIGS / "logging.conf"), "--dataset_dir", str(data["brats2021"]), "--bundle_root", str(root),
           "--epochs", "2", *TINY, "--tracking", "mlflow", "--experiment_name", "tests")
    return root


def test_training_writes_best_model_resume_checkpoint_and_mlflow_run(trained):
    assert (trained / "models" / "model.pt").is_file()
    assert sorted(p.name for p in (trained / "models").glob("resume_*.pt")) == ["resume_checkpoint_epoch=2.pt"]
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("decoder1.attention_gate") for k in state["model"])  # the attention/SE network
    settings = {"_target_": "custom.networks.SwinUNETRAttSE", "feature_size": 12, "depths": [1, 1, 1, 1], "spacing": [5.0, 5.0, 5.0],
                "roi_size": [64, 32, 32]}
    assert settings.items() <= state["network"].items()  # the settings it was trained with, beside the weights
    resume = torch.load(trained / "models" / "resume_checkpoint_epoch=2.pt", weights_only=False)
    assert resume["network"] == state["network"]
    # MLflow: the default store is SQLite under <bundle_root>/eval, holding one run with params and metrics
    db = trained / "eval" / "mlruns.db"
    assert db.is_file()
    con = sqlite3.connect(db)
    runs = con.execute("select run_uuid, status from runs").fetchall()
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    params = dict(con.execute("select key, value from params").fetchall())
    for key in ("network.class", "network.feature_size", "network.spatial_attention", "network.squeeze_excitation", "roi_size",
                "batch_size", "learning_rate", "epochs", "seed", "fold", "git_commit"):
        assert key in params, key
    assert params["network.class"] == "SwinUNETRAttSE" and params["roi_size"] == "[64, 32, 32]"
    metrics = {k for (k,) in con.execute("select distinct key from metrics").fetchall()}
    assert {"train_loss", "train_loss_epoch", "val_mean_dice", "val_dice_tc", "val_dice_wt", "val_dice_et"} <= metrics
    for key in ("val_mean_dice", "train_loss_epoch"):
        assert con.execute(f"select count(*) from metrics where key='{key}'").fetchone()[0] == 2, key  # once an epoch
    artifacts = {p.name for p in (trained / "eval" / "mlruns").rglob("*") if p.is_file()}
    assert "validation_overlay.png" in artifacts
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts)


def _train_workflow(dataset_dir: Path, bundle_root: Path, **overrides):
    """train.json + quick.json + TINY as an initialised ``monai.bundle.ConfigWorkflow`` in this process,
    so that its engines and scheduler can be inspected."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[TRAIN, QUICK], meta_file=str(CONFIGS / "metadata.json"), workflow_type="train")
    tiny = {k.lstrip("-"): ast.literal_eval(v) for k, v in zip(TINY[::2], TINY[1::2])}
    for k, v in {**tiny, "dataset_dir": str(dataset_dir), "bundle_root": str(bundle_root), **overrides}.items():
        wf.parser[k] = v
    wf.initialize()
    return wf


def test_iterations_per_epoch_sets_the_epoch_length_and_the_lr_schedule(data, tmp_path):
    from ignite.engine import Events

    # 2 training cases, no validation (interval beyond the run)
    two_cases = {"train_datalist": "$datalist.select_fold(@datalist, @fold, validation=False)[:2]", "val_interval": 100, "epochs": 2}
    wf = _train_workflow(data["brats2021"], tmp_path / "fixed", iterations_per_epoch=6, **two_cases)
    trainer, scheduler = wf.parser.get_parsed_content("train#trainer"), wf.parser.get_parsed_content("lr_scheduler")
    assert len(wf.parser.get_parsed_content("train#dataloader")) == 2
    assert (scheduler.warmup_steps, scheduler.t_total) == (6, 12)  # warmup_epochs 1 and epochs 2, in iterations
    assert wf.parser.get_parsed_content("tracking_params")["iterations_per_epoch"] == 6  # an MLflow parameter
    cases, restarts = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: cases.append(e.state.batch[0]["case_id"]))  # decollated
    trainer.add_event_handler(Events.DATALOADER_STOP_ITERATION, lambda e: restarts.append(e.state.iteration))
    wf.run()
    assert (trainer.state.epoch, trainer.state.iteration, trainer.state.epoch_length) == (2, 12, 6)
    assert scheduler.last_epoch == 12  # stepped once an iteration, to the end of the cosine
    # ignite starts a new pass (a new shuffled iterator) whenever the data runs out, also across epochs: 6 passes
    assert restarts == [2, 4, 6, 8, 10] and all(len(set(cases[i:i + 2])) == 2 for i in range(0, 12, 2)), (restarts, cases)
    saved = torch.load(tmp_path / "fixed" / "models" / "resume_checkpoint_epoch=2.pt", weights_only=False)["trainer"]
    assert (saved["epoch_length"], saved["iteration"]) == (6, 12)

    # null: one pass over the training cases an epoch
    wf = _train_workflow(data["brats2021"], tmp_path / "one_pass", iterations_per_epoch=None, **{**two_cases, "epochs": 1})
    trainer, scheduler = wf.parser.get_parsed_content("train#trainer"), wf.parser.get_parsed_content("lr_scheduler")
    wf.run()
    assert (trainer.state.iteration, trainer.state.epoch_length, scheduler.t_total) == (2, 2, 2)


def test_resume_after_sigkill_continues_from_last_checkpoint(data, tmp_path):
    args = [PYTHON, "-m", "monai.bundle", "run", "training", "--config_file", configs("train.json", "quick.json"),
            "--logging_file", str(CONFIGS / "logging.conf"), "--dataset_dir", str(data["brats2021"]), "--bundle_root", str(tmp_path),
            *TINY, "--val_interval", "10", "--tracking", "mlflow", "--experiment_name", "resume"]
    proc = subprocess.Popen([*args, "--epochs", "50"], cwd=REPO, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while not list((tmp_path / "models").glob("resume_checkpoint_epoch=2.pt")):
            assert proc.poll() is None and time.time() < deadline, "training ended or stalled before its second checkpoint"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = sorted((tmp_path / "models").glob("resume_*.pt"))
    assert len(saved) == 1
    torch.load(saved[0], weights_only=False)  # complete: written to a temporary file, then renamed
    epoch = int(saved[0].stem.split("=")[1])
    resumed = subprocess.run([*args, "--epochs", str(epoch + 2), "--resume", "true"], cwd=REPO, env=run_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"Epoch: {epoch + 1}/{epoch + 2}" in log and "Epoch: 1/" not in log
    assert [p.name for p in (tmp_path / "models").glob("resume_*.pt")] == [f"resume_checkpoint_epoch={epoch + 2}.pt"]
    # MLflow: the killed run (left RUNNING) is continued and finished, not duplicated
    assert "MLflow tracking failed" not in log
    con = sqlite3.connect(tmp_path / "eval" / "mlruns.db")
    runs = con.execute("select run_uuid, status from runs").fetchall()
    assert len(runs) == 1 and runs[0][1] == "FINISHED", runs
    steps = {s for (s,) in con.execute("select step from metrics where key='train_loss_epoch'")}
    assert {1, epoch + 1, epoch + 2} <= steps, steps  # epochs before and after the kill, in one run
    tags = dict(con.execute("select key, value from tags").fetchall())
    assert tags.get("resumed.epochs") == str(epoch + 2)  # the resumed command's changed parameter


def test_evaluation_metrics_match_an_independent_computation(trained, data, tmp_path):
    out = tmp_path / "eval"
    bundle("run", "evaluating", "--config_file", configs("train.json", "quick.json", "evaluate.json"), "--dataset_dir",
           str(data["heldout"]), "--bundle_root", str(trained), "--output_dir", str(out), *TINY)
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert header == ["case_id", "dice_TC", "dice_WT", "dice_ET", "dice_mean", "hd95_TC", "hd95_WT", "hd95_ET", "hd95_mean"]
    table = {r.split(",")[0]: dict(zip(header[1:], map(float, r.split(",")[1:]))) for r in rows[1:]}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 2
    assert summary["dice_WT"]["mean"] == pytest.approx(np.mean([t["dice_WT"] for t in table.values()]), abs=1e-5)
    # the same model's predictions written by the inference workflow, scored here with numpy
    pred_dir = tmp_path / "pred"
    bundle("run", "inference", "--config_file", configs("inference.json", "quick.json"), "--dataset_dir", str(data["heldout"]),
           "--bundle_root", str(trained), "--output_dir", str(pred_dir), *TINY)
    conv = CONVENTIONS["brats2021"]
    for case in list_cases(data["heldout"]):
        pred = np.asarray(nib.load(pred_dir / f"{case.case_id}.nii.gz").dataobj)
        gt = np.asarray(nib.load(case.label).dataobj)
        for region, values in conv.region_labels.items():
            p, g = np.isin(pred, values), np.isin(gt, values)
            dice = 1.0 if p.sum() + g.sum() == 0 else 2 * (p & g).sum() / (p.sum() + g.sum())
            assert table[case.case_id][f"dice_{region}"] == pytest.approx(dice, abs=1e-4), (case.case_id, region)


def test_region_metrics_follow_brats_conventions():
    gt = np.zeros((3, 20, 20, 20), bool)
    gt[:, 5:10, 5:10, 5:10] = True
    gt[2] = False  # no ET in the ground truth
    pred = gt.copy()
    pred[1, 5:10, 5:10, 10:12] = True  # WT: 2 extra slices -> a surface 2 voxels (4 mm at 2 mm spacing) off
    m = region_metrics(pred, gt, spacing=(2.0, 2.0, 2.0))
    assert m["TC"] == {"dice": 1.0, "hd95": 0.0}
    assert m["WT"]["dice"] == pytest.approx(2 * 125 / (125 + 175))
    assert m["WT"]["hd95"] == pytest.approx(4.0)
    assert m["ET"] == {"dice": 1.0, "hd95": 0.0}  # both empty
    pred[2, 0, 0, 0] = True
    assert region_metrics(pred, gt)["ET"] == {"dice": 0.0, "hd95": HD95_ONE_EMPTY_MM}  # one empty


@pytest.mark.parametrize("layout", ["brats2021", "brats2023", "msd"])
def test_inference_writes_submission_files_in_each_layout(trained, data, layout, tmp_path):
    out = tmp_path / "pred"
    crf = [] if layout == "msd" else ["--use_crf", "true"]  # the CRF is off by default; the switch works from the command line
    proc = bundle("run", "inference", "--config_file", configs("inference.json", "quick.json"), "--dataset_dir", str(data[layout]),
                  "--bundle_root", str(trained), "--output_dir", str(out), *TINY, *crf)
    assert ("DenseCRFd" in proc.stdout + proc.stderr) == bool(crf)  # the CRF ran on every case, or not at all
    cases = list_cases(data[layout])
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{c.case_id}.nii.gz" for c in cases)  # labelled or not
    conv = cases[0].layout.convention
    for case in cases:
        ref = nib.load(case.images[0])
        pred = nib.load(out / f"{case.case_id}.nii.gz")
        assert pred.shape == ref.shape[:3]
        assert np.allclose(pred.affine, ref.affine, atol=1e-4)
        assert pred.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(conv.values)


def test_inference_output_is_in_the_input_grid_for_reoriented_inputs(trained, data, tmp_path):
    """A case stored in RAS (not BraTS's LPS) comes back in its own grid, not the network's."""
    src = list_cases(data["brats2021"])[0]
    case_dir = tmp_path / "ras" / src.case_id
    case_dir.mkdir(parents=True)
    for path in (*src.images, src.label):
        img = nib.load(path)
        ras = nib.as_closest_canonical(img)
        nib.save(ras, case_dir / Path(path).name)
    bundle("run", "inference", "--config_file", configs("inference.json", "quick.json"), "--dataset_dir", str(tmp_path / "ras"),
           "--bundle_root", str(trained), "--output_dir", str(tmp_path / "pred"), *TINY)
    pred = nib.load(tmp_path / "pred" / f"{src.case_id}.nii.gz")
    ref = nib.load(case_dir / Path(src.images[0]).name)
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4)


def test_torchrun_two_processes_gloo(data, tmp_path):
    cmd = ["torchrun", "--nproc_per_node=2", "--master_port", str(29500 + os.getpid() % 1000), "-m", "monai.bundle", "run", "training",
           "--config_file", configs("train.json", "multi_gpu_train.json", "quick.json"), "--logging_file", str(CONFIGS / "logging.conf"),
           "--dataset_dir", str(data["brats2021"]), "--bundle_root", str(tmp_path), "--epochs", "2", *TINY]
    env = run_env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    assert [p.name for p in (tmp_path / "models").glob("resume_*.pt")] == ["resume_checkpoint_epoch=2.pt"]
    # 4 training cases split over 2 ranks: each rank runs 2 iterations an epoch; only rank 0 logs them
    assert log.count("Epoch: 1/2, Iter: 1/2") == 1 and "Iter: 3/" not in log


def test_unet_baseline_trains_with_the_same_pipeline(data, tmp_path):
    bundle("run", "training", "--config_file", configs("train.json", "unet.json", "quick.json"), "--dataset_dir", str(data["brats2021"]),
           "--bundle_root", str(tmp_path), "--epochs", "1", *TINY)
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("model.") for k in state["model"]) and not any("swinViT" in k for k in state["model"])
    assert state["network"]["_target_"] == "monai.networks.nets.UNet"


def test_metadata_network_and_export_commands(trained, tmp_path):
    meta = str(CONFIGS / "metadata.json")
    bundle("verify_metadata", "--meta_file", meta, "--filepath", str(REPO / "bundle" / "docs" / "meta_schema.json"))
    bundle("verify_net_in_out", "network_def", "--meta_file", meta, "--config_file", configs("inference.json", "quick.json"), "--n", "2", *NET)
    ts = tmp_path / "model.ts"
    bundle("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(trained / "models" / "model.pt"), "--key_in_ckpt", "model",
           "--meta_file", meta, "--config_file", configs("inference.json", "quick.json"), "--use_trace", "True",
           "--input_shape", "[1,4,64,64,64]", *NET)
    scripted = torch.jit.load(ts)
    with torch.no_grad():
        assert scripted(torch.zeros(1, 4, 64, 64, 64)).shape == (1, 3, 64, 64, 64)


def test_inference_config_repeats_the_training_pipeline_exactly():
    """inference.json must stand alone (MONAI Label reads it by itself); this keeps it in step with train.json."""
    train, infer = (json.loads((CONFIGS / n).read_text()) for n in ("train.json", "inference.json"))
    for key in ("network_def", "network_settings", "deterministic_transforms", "feature_size", "depths", "num_heads", "spatial_attention",
                "squeeze_excitation", "dropout_prob", "roi_size", "spacing", "sw_batch_size", "sw_overlap", "layout", "label_convention",
                "use_crf", "threshold", "brain_edge_mm", "sigmoid", "crf", "discretize", "to_label", "use_largest_component", "largest_component"):
        assert infer[key] == train[key], key
    assert infer["inferer"] == train["validate"]["inferer"]


def test_largest_component_keeps_the_main_tumour_and_is_switchable(tmp_path):
    """``largest_component`` keeps the largest connected tumour (all labels together, so a core inside
    oedema stays) and drops a separate blob; ``use_largest_component`` false takes it out of the chain."""
    from monai.bundle import ConfigParser

    label = torch.zeros(1, 24, 24, 24, dtype=torch.uint8)
    label[0, 2:12, 2:12, 2:12] = 2  # oedema
    label[0, 5:9, 5:9, 5:9] = 4  # enhancing core inside it
    label[0, 18:21, 18:21, 18:21] = 1  # a far, smaller blob
    write_toy_dataset(tmp_path, "brats2021", n=1)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["dataset_dir"] = str(tmp_path)
    step = parser.get_parsed_content("largest_component")
    kept = step({"pred": label.clone()})["pred"]
    assert int((kept == 4).sum()) == 64 and int((kept == 2).sum()) == 1000 - 64 and int((kept == 1).sum()) == 0
    assert step in parser.get_parsed_content("postprocessing").transforms
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["dataset_dir"], parser["use_largest_component"] = str(tmp_path), False
    assert parser.get_parsed_content("largest_component") is None
    assert len(parser.get_parsed_content("postprocessing").transforms) == 5  # sigmoid, invert, discretize, to_label, writer (the CRF is off too)


def test_one_threshold_id_decides_training_evaluation_and_inference(tmp_path):
    """``threshold`` is read by every AsDiscreted of the pipeline: one override moves them all."""
    from monai.bundle import ConfigParser
    from monai.transforms import AsDiscreted

    write_toy_dataset(tmp_path, "brats2021", n=2)

    for files, ids in (((TRAIN,), ("train#postprocessing", "validate#postprocessing")), ((TRAIN, str(CONFIGS / "evaluate.json")),
                       ("validate#postprocessing",)), ((str(CONFIGS / "inference.json"),), ("postprocessing",))):
        parser = ConfigParser()
        parser.read_config(list(files))
        parser["threshold"] = 0.7
        parser["dataset_dir"] = str(tmp_path)
        for i in ids:
            found = [t for t in parser.get_parsed_content(i).transforms if isinstance(t, AsDiscreted)]
            assert len(found) == 1 and list(found[0].threshold) == [0.7], (files, i)


def test_bad_dataset_dir_fails_with_a_clear_message(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = bundle("run", "training", "--config_file", configs("train.json", "quick.json"), "--dataset_dir", str(tmp_path / "empty"),
                  "--bundle_root", str(tmp_path), check=False)
    assert proc.returncode != 0
    assert "no BraTS dataset found" in proc.stderr


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    """A bundle root whose models/model.pt is a seeded untrained TINY network (no training run needed)."""
    from monai.bundle import ConfigParser

    root = tmp_path_factory.mktemp("untrained")
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), QUICK])
    parser["feature_size"], parser["depths"] = 12, [1, 1, 1, 1]
    torch.manual_seed(0)
    (root / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    return root


def test_inference_on_missing_sequences_and_a_z_scored_background(untrained, tmp_path):
    """Issue #13: a case with only FLAIR and T1ce runs through the bundle and its result says so (NIfTI
    header `descrip`, log line); a z-scored case whose background is -4.5 (below every brain voxel) gives the same prediction as
    the same case with a 0 background (ZeroBackgroundd right after loading)."""
    src = tmp_path / "src"
    write_dataset(src, 1, seed=4, layout="brats2021", size="small")
    data = tmp_path / "data"
    cid = "BraTS2021_00000"
    shutil.copytree(src / cid, data / cid)
    for m in ("t1", "t2"):
        (data / cid / f"{cid}_{m}.nii.gz").unlink()
    for name, background in (("BraTS2021_00001", 0.0), ("BraTS2021_00002", -4.5)):  # z-scored brain, constant background below it
        (data / name).mkdir()
        for m in MODALITIES:
            img = nib.load(src / cid / f"{cid}_{m}.nii.gz")
            x = np.asarray(img.dataobj).astype(np.float32)
            brain = x > 0
            z = np.full(x.shape, background, np.float32)
            z[brain] = (x[brain] - x[brain].mean()) / x[brain].std()
            assert z[brain].min() > -4.5
            nib.save(nib.Nifti1Image(z, img.affine), data / name / f"{name}_{m}.nii.gz")
    for copy in ("copy_a", "copy_b"):  # copied cases: the files keep another case's names
        shutil.copytree(src / cid, data / copy)
    out = tmp_path / "pred"
    proc = bundle("run", "inference", "--config_file", configs("inference.json", "quick.json"), "--logging_file", str(CONFIGS / "logging.conf"),
                  "--dataset_dir", str(data), "--bundle_root", str(untrained), "--output_dir", str(out), "--use_crf", "false", *TINY)
    log = proc.stdout + proc.stderr
    assert f"case {cid}: sequences T1ce, FLAIR (missing T1, T2: zero-filled)" in log, log[-3000:]
    assert "case BraTS2021_00002: constant background set to 0" in log and "case BraTS2021_00001: constant background" not in log
    partial = nib.load(out / f"{cid}.nii.gz")
    assert partial.header["descrip"].tobytes().rstrip(b"\0") == b"sequences: t1ce,flair"
    ref = nib.load(src / cid / f"{cid}_flair.nii.gz")
    assert partial.shape == ref.shape and np.allclose(partial.affine, ref.affine, atol=1e-4)
    full = nib.load(out / "BraTS2021_00001.nii.gz")
    assert full.header["descrip"].tobytes().rstrip(b"\0") == b"sequences: t1,t1ce,t2,flair"
    np.testing.assert_array_equal(np.asarray(nib.load(out / "BraTS2021_00002.nii.gz").dataobj), np.asarray(full.dataobj))
    # each copied case gets its own output, named after its folder; nothing overwrote the partial case's output
    for copy in ("copy_a", "copy_b"):
        assert nib.load(out / f"{copy}.nii.gz").header["descrip"].tobytes().rstrip(b"\0") == b"sequences: t1,t1ce,t2,flair"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{c}.nii.gz" for c in (cid, "BraTS2021_00001", "BraTS2021_00002", "copy_a", "copy_b"))
