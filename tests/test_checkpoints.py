"""Weights that do not fit the configured network are refused at load, naming both; checkpoints and
exported weights record the network settings they were trained with (custom/handlers/checkpoints.py, the
bundle's CheckedCheckpointLoader, tools/export_weights.py, the MONAI Label train task's pre-check).

Real checkpoint files of tiny networks (feature_size 12 or 24, depths [1, 1, 1, 1] or [2, 2, 2, 2], the
U-Net of unet.json), loaded through the bundle's own configs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from custom.handlers.checkpoints import NetworkRecord, WeightsMismatchError
from devtools import REPO

CONFIGS = REPO / "bundle" / "configs"
SHIPPED = REPO / "bundle" / "models" / "model.pt"


def _parser(*configs: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    parser["device"] = "$torch.device('cpu')"
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _save(path: Path, *configs: str, record: bool = True, **overrides) -> dict:
    """A seeded network of ``configs`` + ``overrides`` saved at ``path``: ``{"model", "network"}`` as training
    writes it (``record``) or a bare state dict; returns its recorded settings."""
    parser = _parser(*configs, **overrides)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    settings = NetworkRecord(network, parser.get_parsed_content("network_settings")).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": network.state_dict(), "network": settings} if record else network.state_dict(), path)
    return settings


def _load(path: Path, *configs: str, **overrides) -> torch.nn.Module:
    """Run the checkpoint loader of ``inference.json`` (+ ``configs``) on ``path``; returns the loaded network."""
    parser = _parser("inference.json", *configs, ckpt_path=str(path), **overrides)
    parser.get_parsed_content("checkpoint_loader")(Engine(lambda engine, batch: None))
    return parser.get_parsed_content("network")


@pytest.mark.parametrize("weights, expected", [
    ({"feature_size": 24}, "weights of SwinUNETRAttSE feature_size 24 do not fit the configured network SwinUNETRAttSE feature_size 12 "
                           "(set feature_size to the weights' values or use other weights; "),
    ({"depths": [2, 2, 2, 2]}, "weights of SwinUNETRAttSE depths [2, 2, 2, 2] do not fit the configured network SwinUNETRAttSE "
                               "depths [1, 1, 1, 1] (set depths to the weights' values"),
], ids=["width", "depth"])
def test_weights_of_another_width_or_depth_are_refused_naming_both(tmp_path, weights, expected):
    path = tmp_path / "model.pt"
    _save(path, "inference.json", **weights)
    with pytest.raises(WeightsMismatchError) as e:
        _load(path)
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith(f"{path}: {expected}"), str(e.value)


def test_weights_of_another_architecture_are_refused_naming_both(tmp_path):
    path = tmp_path / "unet.pt"
    _save(path, "inference.json", "unet.json")
    with pytest.raises(WeightsMismatchError, match=re.escape(f"{path}: weights of UNet do not fit the configured network SwinUNETRAttSE "
                                                             "(configure network_def as UNet or use other weights; ")):
        _load(path)
    swin = tmp_path / "swin.pt"  # and the other way round: Swin weights for the U-Net of unet.json
    _save(swin, "inference.json")
    with pytest.raises(WeightsMismatchError, match=re.escape("weights of SwinUNETRAttSE do not fit the configured network UNet")):
        _load(swin, "unet.json")


def test_unrecorded_weights_are_refused_naming_the_tensors_that_differ(tmp_path):
    """A bare state dict (no settings in it, no model.json for it): the configured settings and the first tensors that differ."""
    path = tmp_path / "model.pt"
    _save(path, "inference.json", record=False, feature_size=24)
    with pytest.raises(WeightsMismatchError) as e:
        _load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: weights (no network settings recorded with them) do not fit the configured network "
                              "SwinUNETRAttSE feature_size 12, depths [1, 1, 1, 1], num_heads [3, 6, 12, 24], "), message
    assert re.search(r": \d+ tensors of another shape \(swinViT\.patch_embed\.proj\.weight: weights \[24, 4, 2, 2, 2\], "
                     r"network \[12, 4, 2, 2, 2\], .* and \d+ more\)$", message), message


def test_model_json_beside_bare_weights_names_their_settings_if_it_records_that_file(tmp_path):
    """The shipped layout (bare fp16 state dict + model.json): the record counts only for the very file (size and sha256)."""
    path = tmp_path / "model.pt"
    settings = _save(path, "inference.json", record=False, feature_size=24)
    data = path.read_bytes()
    record = {"file": "model.pt", "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "network": settings}
    (tmp_path / "model.json").write_text(json.dumps(record))
    with pytest.raises(WeightsMismatchError, match=re.escape(f"{path}: weights of SwinUNETRAttSE feature_size 24 do not fit the configured "
                                                             "network SwinUNETRAttSE feature_size 12")):
        _load(path)
    (tmp_path / "model.json").write_text(json.dumps({**record, "sha256": "0" * 64}))  # a record of other weights
    with pytest.raises(WeightsMismatchError, match="no network settings recorded"):
        _load(path)


def test_fitting_weights_load_in_both_formats(tmp_path, caplog):
    """The shipped fp16 file ({"model", "network"}) and the same weights as a bare state dict load alike; a recorded
    checkpoint whose tensors fit but whose data settings differ loads with a warning naming both."""
    network = _load(SHIPPED)
    shipped = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    weights = shipped.get("model", shipped)  # recorded, or bare (the first shipped format)
    name, tensor = next((k, v) for k, v in weights.items() if v.is_floating_point())
    assert torch.equal(network.state_dict()[name], tensor.float())
    bare = tmp_path / "bare" / "model.pt"
    bare.parent.mkdir()
    torch.save(weights, bare)
    assert torch.equal(_load(bare).state_dict()[name], tensor.float())
    path = tmp_path / "model.pt"
    _save(path, "inference.json", spacing=[1.0, 1.0, 1.0])
    with caplog.at_level(logging.WARNING):
        _load(path)
    assert "weights of SwinUNETRAttSE spacing [1.0, 1.0, 1.0]" in caplog.text and "network SwinUNETRAttSE spacing [2.0, 2.0, 2.0]" in caplog.text


def test_strict_false_loads_weights_without_the_new_layers(tmp_path, caplog):
    """MONAI CheckpointLoader semantics: strict refuses weights without the attention gates and SE layers (naming the
    settings), strict=False loads them into the rest of the network."""
    path = tmp_path / "model.pt"
    _save(path, "inference.json", spatial_attention=False, squeeze_excitation=False)
    with pytest.raises(WeightsMismatchError, match=re.escape("weights of SwinUNETRAttSE spatial_attention False, squeeze_excitation False "
                                                             "do not fit the configured network SwinUNETRAttSE spatial_attention True, "
                                                             "squeeze_excitation True")):
        _load(path)
    parser = _parser("inference.json", ckpt_path=str(path))
    parser["checkpoint_loader#strict"] = False
    parser.get_parsed_content("checkpoint_loader")(Engine(lambda engine, batch: None))
    assert re.search(r"strict off: \d+ of the network's \d+ tensors loaded, 60 keep their initial values, 0 of the weights unused", caplog.text)


def test_every_checkpoint_loader_checks_the_network():
    """No bare CheckpointLoader left in the bundle's configs or the app's train task; each checked one gets the settings."""
    loaders = []

    def walk(node):
        if isinstance(node, dict):
            if "CheckpointLoader" in str(node.get("_target_", "")):
                loaders.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for config in CONFIGS.glob("*.json"):
        walk(json.loads(config.read_text()))
    assert len(loaders) == 3  # inference.json, evaluate.json, train.json's resume_loader
    for loader in loaders:
        assert loader["_target_"] == "custom.handlers.checkpoints.CheckedCheckpointLoader" and loader["network_settings"] == "@network_settings"
    trainer = (REPO / "monailabel_app" / "lib" / "trainers" / "brats_bundle.py").read_text()
    assert '"_target_": "custom.handlers.checkpoints.CheckedCheckpointLoader"' in trainer and '"_target_": "CheckpointLoader"' not in trainer
    train = json.loads((CONFIGS / "train.json").read_text())
    assert train["train"]["checkpointer"]["save_dict"]["network"] == train["validate"]["best_model_saver"]["save_dict"]["network"] == "@network_record"


def test_training_record_holds_the_network_class_and_settings():
    parser = _parser("train.json")
    assert parser.get_parsed_content("network_record").state_dict() == {
        "_target_": "custom.networks.SwinUNETRAttSE", "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 6, 12, 24],
        "spatial_attention": True, "squeeze_excitation": True, "dropout_prob": 0.1, "spacing": [2.0, 2.0, 2.0], "roi_size": [64, 64, 64]}


def _export_weights():
    spec = importlib.util.spec_from_file_location("export_weights", REPO / "tools" / "export_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_writes_settings_into_the_file_and_model_json(tmp_path, capsys):
    export = _export_weights()
    checkpoint = tmp_path / "run" / "model.pt"
    settings = _save(checkpoint, "train.json")
    out = tmp_path / "bundle" / "model.pt"
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(out), "--command", "test"]) == 0
    exported = torch.load(out, map_location="cpu", weights_only=True)
    assert exported["network"] == settings and all(v.dtype == torch.float16 for v in exported["model"].values() if v.is_floating_point())
    record = json.loads((tmp_path / "bundle" / "model.json").read_text())
    assert record["network"] == settings and record["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    _load(out)  # the exported file loads through inference.json
    wide = tmp_path / "run" / "wide.pt"
    _save(wide, "train.json", feature_size=24)
    with pytest.raises(WeightsMismatchError, match=re.escape(f"{wide}: weights of SwinUNETRAttSE feature_size 24 do not fit")):
        export.main(["--checkpoint", str(wide), "--out", str(tmp_path / "other" / "model.pt")])
    assert not (tmp_path / "other").exists()


class _Datastore:
    """The two labelled studies a train request needs (never read: the weights are refused first)."""

    def datalist(self):
        return [{"image": f"/studies/BRATS_00{i}.nii.gz", "label": f"/studies/labels/BRATS_00{i}.nii.gz"} for i in (1, 2)]


def test_app_fine_tuning_refuses_weights_that_do_not_fit_before_training(tmp_path):
    from lib.trainers import BraTSBundleTrain

    shutil.copytree(CONFIGS, tmp_path / "bundle" / "configs")
    model = tmp_path / "bundle" / "models" / "model.pt"
    _save(model, "train.json", "quick.json", depths=[2, 2, 2, 2])
    task = BraTSBundleTrain(str(tmp_path / "bundle"), ["train.json", "quick.json"], {"layout": "$brats.LAYOUTS['msd']"})
    with pytest.raises(WeightsMismatchError, match=re.escape(f"{model}: weights of SwinUNETRAttSE depths [2, 2, 2, 2] do not fit the "
                                                             "configured network SwinUNETRAttSE depths [1, 1, 1, 1]")) as e:
        task({"model": "brats", "max_epochs": 1, "tracking": "None"}, _Datastore())
    assert str(e.value).endswith("or train from scratch with pretrained false")
