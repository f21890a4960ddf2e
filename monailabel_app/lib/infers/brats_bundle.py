"""Inference task serving the repo's MONAI Bundle (``bundle/configs/inference.json``) to MONAI Label.

Every transform, the network and the inferer come from the bundle's own config parsed with
``monai.bundle.ConfigParser``; nothing of the pipeline is re-written here. MONAI Label specifics:

- ``layout`` is overridden with the studies' layout (``custom.data.LAYOUTS[...]``): its channel
  order and label convention, because a MONAI Label study is one case, not a dataset folder;
- the input is one 4D NIfTI ``(H, W, D, 4)`` or the 3D modality files of a BraTS case (the app
  resolves the image id to them), with ``sequences`` naming the sequences present when a case lacks
  some (the bundle's loader fills their channels with zeros; the result JSON's ``sequences`` says
  which were used);
- config ids switch the bundle's steps (``APP_OVERRIDES``): its ``writer`` is disabled, the label map
  (1, H, W, D) is squeezed to (H, W, D) uint8 and handed to MONAI Label's writer; ``invert`` also
  takes an uncertainty map back to the image's grid; a request without the CRF leaves out ``crf``;
- labels shown to Slicer/OHIF are the parsed ``label_convention``'s names and values;
- the weights are checked against the configured network (``network_def``, ``network_settings``) at
  start-up and whenever the file changes (``custom.handlers.checkpoints.check_weights``): weights that do not
  fit are flagged in ``/info`` and inference answers 503 with a message naming both.

Per-request options (``params`` of ``POST /infer/<model>``):

- ``crf`` (bool, default: the bundle's ``use_crf``): run the bundle's dense-CRF step or skip it;
- ``uncertainty`` (bool, default false): return, instead of the label map, the voxel-wise
  Monte-Carlo-dropout epistemic uncertainty (mutual information between prediction and dropout
  mask, summed over TC/WT/ET, nats, float32 NIfTI in the image's grid) of ``mc_samples`` (default
  8, 2..64) dropout draws; the label volumes in the JSON then come from the MC-mean prediction and
  the JSON adds ``uncertainty`` summary statistics.

Not thread-safe on its own (one parser, cached transform instances, needed so the ``Invertd`` in
``postprocessing`` finds the very ``preprocessing`` objects that ran): requests are serialised
with a lock.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np
import torch
from fastapi import HTTPException
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import CastToTyped, Compose, SqueezeDimd
from monai.utils import convert_to_numpy
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from custom.data import MODALITIES
from custom.handlers.checkpoints import WeightsMismatchError, check_weights
from custom.metrics import region_volumes_ml
from custom.uncertainty import mc_dropout_pass
from lib.bundle_config import load_bundle_config
from lib.params import MAX_MC_SAMPLES, mc_samples, truthy

logger = logging.getLogger(__name__)

MC_SAMPLES = 8
# Display colours (RGB 0-255) by label meaning, BraTS-paper style; Slicer colours segments by name
# from its own GenericAnatomyColors table, other clients can read `label_colors` from /info.
COLOURS = {"ncr": (255, 255, 0), "ed": (0, 200, 0), "et": (220, 0, 0)}
# The bundle's inference pipeline as the app runs it: MONAI Label writes the result, and an uncertainty
# map (MC dropout) goes back to the image's grid with the prediction.
APP_OVERRIDES = {"writer#_disabled_": True, "invert#keys": ["pred", "uncertainty_map"], "invert#allow_missing_keys": True}


class BraTSBundleInfer(BasicInferTask):
    """``POST /infer/<model>``: the bundle's inference pipeline on one BraTS case."""

    def __init__(
        self,
        bundle_root: str,
        configs: Sequence[str] = ("inference.json",),
        overrides: dict | None = None,
        model_path: str | None = None,
        **kwargs,
    ):
        self.bundle_root = os.path.abspath(bundle_root)
        self.configs = list(configs)
        self.overrides = dict(overrides or {})
        self.parser = load_bundle_config(self.bundle_root, self.configs, {**APP_OVERRIDES, **self.overrides})
        # The CRF stays in the parsed post-processing; requests drop it when they do not want it.
        self.default_crf = truthy(self.parser["use_crf"], "use_crf")
        self.parser["use_crf"] = True
        self._lock = threading.RLock()

        model_path = os.path.abspath(model_path or os.path.join(self.bundle_root, "models", "model.pt"))
        self.model_path = model_path
        self.has_weights = os.path.isfile(model_path)

        network = self.parser.get_parsed_content("network_def", instantiate=True)
        # the settings the weights must have been trained with (feature_size, depths...), checked at (re)load
        self.network_settings = self.parser.get_parsed_content("network_settings") if self.parser.get("network_settings") else None
        self._weights_checked: tuple[float, str | None] | None = None  # (mtime of model_path, why they do not fit)
        self.convention = self.parser.get_parsed_content("label_convention")
        labels = {name: int(value) for value, name in sorted(self.convention.names.items())}
        meaning = {self.convention.ncr: "ncr", self.convention.ed: "ed", self.convention.et: "et"}
        self.label_colors = {name: list(COLOURS[meaning[value]]) for name, value in labels.items()}

        description = "BraTS tumour segmentation (MONAI Bundle)"
        metadata_path = os.path.join(self.bundle_root, "configs", "metadata.json")
        version = None
        if os.path.isfile(metadata_path):
            with open(metadata_path) as f:
                metadata = json.load(f)
            description = metadata.get("description", description)
            version = metadata.get("version")
        if not self.has_weights:
            description = f"NO WEIGHTS: {model_path} does not exist; inference is refused until it does. " + description
        self.version = version

        super().__init__(
            path=model_path,
            network=network,
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=3,
            description=description,
            load_strict=True,
            config={"crf": self.default_crf},  # options 3D Slicer shows for this model
            **kwargs,
        )
        problem = self.weights_problem()
        if problem:
            logger.warning(f"Model weights do not fit the configured network; inference is refused until they do: {problem}")
            self.description = f"WEIGHTS DO NOT FIT: {problem}. " + self.description

    def is_valid(self) -> bool:
        # Listed in /info even without weights (the description says so); inference refuses.
        return True

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["version"] = self.version
        i["label_colors"] = self.label_colors
        i["bundle"] = {
            "bundle_root": self.bundle_root,
            "bundle_configs": ",".join(self.configs),
            "model_path": self.model_path,
            "weights": "missing" if not os.path.isfile(self.model_path) else "do not fit" if self.weights_problem() else "present",
            "label_convention": self.convention.name,
            "request_options": {"crf": "bool", "uncertainty": "bool", "mc_samples": f"int 2..{MAX_MC_SAMPLES}"},
        }
        return i

    def __call__(self, request, callbacks=None):
        request = dict(request)
        request["crf"] = truthy(request.get("crf", self.default_crf), "crf")
        request["uncertainty"] = truthy(request.get("uncertainty", False), "uncertainty")
        if request["uncertainty"]:
            request["mc_samples"] = mc_samples(request.get("mc_samples", MC_SAMPLES))
        request.setdefault("result_extension", ".nii.gz")
        with self._lock:
            return super().__call__(request, callbacks)

    def _get_network(self, device, data):
        self.has_weights = os.path.isfile(self.model_path)
        if not self.has_weights:
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR,
                f"No model weights at {self.model_path}: train the bundle (POST /train/<model>) or pass --conf model_path PATH",
            )
        problem = self.weights_problem()
        if problem:  # the server's model is unusable until its weights or configs are changed: 503 with the reason
            raise HTTPException(status_code=503, detail=problem)
        return super()._get_network(device, data)

    def weights_problem(self) -> str | None:
        """Why the weights at ``model_path`` cannot load into the configured network (None: they fit, or
        there are none); checked with ``custom.handlers.checkpoints.check_weights`` once per file version (mtime)."""
        try:
            mtime = os.stat(self.model_path).st_mtime
        except FileNotFoundError:
            return None
        if self._weights_checked is None or self._weights_checked[0] != mtime:
            try:
                check_weights(self.model_path, self.network, self.network_settings, strict=self.load_strict, logger=logger)
                problem = None
            except WeightsMismatchError as e:
                problem = str(e)
            except Exception as e:  # unreadable file: the same refusal, with torch's reason
                problem = f"{self.model_path}: not readable as weights ({type(e).__name__}: {e})"
            self._weights_checked = (mtime, problem)
        return self._weights_checked[1]

    def _transforms(self, key: str) -> list:
        c = self.parser.get_parsed_content(key, instantiate=True)
        return list(c.transforms) if isinstance(c, Compose) else list(c)

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return self._transforms("preprocessing")

    def run_pre_transforms(self, data, transforms):
        # BasicInferTask puts the study path under "image_path"; MONAI 1.6's Spacingd then calls
        # .update() on every "image_*" key of the dict and fails on that str. Hide it meanwhile.
        image_path = data.pop("image_path", None)
        data = super().run_pre_transforms(data, transforms)
        if image_path is not None:
            data["image_path"] = image_path
        return data

    def inferer(self, data=None) -> Inferer:
        return self.parser.get_parsed_content("inferer", instantiate=True)

    def mc_dropout(self, data: dict, device: str, samples: int) -> dict:
        """MC-dropout pass on pre-processed ``data`` (``custom.uncertainty.mc_dropout_pass``): ``pred`` = logit
        of the mean probability ``(3, H, W, D)``, ``uncertainty_map`` = voxel mutual information ``(1, H, W, D)``
        (nats) and ``predictive_entropy`` ``(1, H, W, D)``, all on the pre-processed grid."""
        network = self._get_network(device, data)
        maps = mc_dropout_pass(self.inferer(data), network, data[self.input_key], samples, torch.device(device))
        data[self.output_label_key] = maps["logit"]
        data["uncertainty_map"] = maps["mutual_information"]
        data["predictive_entropy"] = maps["predictive_entropy"]
        return data

    def epistemic_score(self, image, device: str, samples: int, sequences=None) -> dict[str, float]:
        """Mean voxel mutual information and predictive entropy (nats) over the brain of one case.

        ``image``: a 4D NIfTI path or the case's modality paths (canonical order), ``sequences``
        their names when the case lacks some (None: all four)."""
        item = {"image": image} if sequences is None else {"image": image, "sequences": list(sequences)}
        with self._lock:
            data = self.run_pre_transforms(item, self.pre_transforms())
            data = self.mc_dropout(data, device, samples)
        brain = (data[self.input_key] != 0).any(dim=0, keepdim=True).cpu()
        if not brain.any():
            brain = torch.ones_like(brain)
        return {k: float(data[key].cpu()[brain].mean()) for k, key in (("mutual_information", "uncertainty_map"), ("predictive_entropy", "predictive_entropy"))}

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        if not data.get("uncertainty"):
            return super().run_inferer(data, convert_to_batch=convert_to_batch, device=device)
        return self.mc_dropout(data, device, data["mc_samples"])

    def post_transforms(self, data=None) -> Sequence[Callable]:
        # the bundle's post-processing with its ``writer`` disabled (MONAI Label writes the result) and
        # its ``invert`` also taking the uncertainty map back to the image's grid (APP_OVERRIDES)
        data = data or {}
        post = self._transforms("postprocessing")
        if not data.get("crf", self.default_crf):
            crf = self.parser.get_parsed_content("crf")
            post = [t for t in post if t is not crf]
        # (1, H, W, D) label map in the image's grid -> (H, W, D) uint8 for MONAI Label's writer.
        return post + [SqueezeDimd(keys="pred", dim=0), CastToTyped(keys="pred", dtype=np.uint8)]

    def writer(self, data, extension=None, dtype=None):
        """MONAI Label's writer, plus the predicted region volumes in mL (``volumes_ml``: TC, WT, ET)
        whether the CRF ran (``crf``), the modification time of the weights used (``weights_mtime``)
        and the sequences the prediction was made from (``sequences``, canonical order, e.g.
        ``["t1ce", "flair"]``: the others were missing and zero-filled); with ``uncertainty`` the file
        written is the uncertainty map and ``uncertainty`` summarises it."""
        pred = data["pred"]
        affine = np.asarray(pred.affine) if isinstance(pred, MetaTensor) else np.eye(4)
        sequences = data.get("sequences") or ",".join(MODALITIES)  # set by the bundle's loader (custom.transforms.CheckedLoadImaged)
        extra = {
            "sequences": [m for m in (sequences.split(",") if isinstance(sequences, str) else sequences) if m],
            "volumes_ml": region_volumes_ml(pred, affine, self.convention),
            "crf": bool(data.get("crf")),
            "weights_mtime": (self._networks.get(data.get("device")) or (None, None))[1],  # which weights answered
        }
        if not data.get("uncertainty"):
            result_file, result_json = super().writer(data, extension=extension, dtype=dtype)
            return result_file, {**(result_json or {}), **extra}
        u = convert_to_numpy(data["uncertainty_map"])[0].astype(np.float32)
        brain = u[convert_to_numpy(pred) > 0] if (pred > 0).any() else u
        extra["uncertainty"] = {
            "measure": "MC-dropout mutual information, summed over TC/WT/ET (nats)",
            "mc_samples": int(data["mc_samples"]),
            "mean": float(u.mean()),
            "max": float(u.max()),
            "mean_in_predicted_tumour": float(brain.mean()),
        }
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        nib.save(nib.Nifti1Image(u, affine), out)
        return out, {**extra}
