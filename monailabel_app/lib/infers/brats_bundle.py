"""Inference task serving the repo's MONAI Bundle (``bundle/configs/inference.json``) to MONAI Label.

Every transform, the network and the inferer come from the bundle's own config parsed with
``monai.bundle.ConfigParser``; nothing of the pipeline is re-written here. MONAI Label specifics:

- ``layout`` is overridden (default: ``custom.brats.LAYOUTS['msd']``) because a MONAI Label study
  is one 4D MSD-style NIfTI a case (FLAIR, T1w, t1gd, T2w), not a dataset folder to detect;
- the bundle's ``SaveImaged`` is dropped from ``postprocessing``; the label map (1, H, W, D) is
  squeezed to (H, W, D) uint8 and handed to MONAI Label's writer;
- labels shown to Slicer/OHIF are the parsed ``label_convention``'s names and values.

Not thread-safe on its own (one parser, cached transform instances, needed so the ``Invertd`` in
``postprocessing`` finds the very ``preprocessing`` objects that ran): requests are serialised
with a lock.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Callable, Sequence

import numpy as np
from monai.bundle import ConfigParser
from monai.inferers import Inferer
from monai.transforms import CastToTyped, Compose, SaveImaged, SqueezeDimd

from custom.metrics import region_volumes_ml
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

logger = logging.getLogger(__name__)

DEFAULT_OVERRIDES = {"layout": "$brats.LAYOUTS['msd']"}


def load_bundle_config(bundle_root: str, configs: Sequence[str], overrides: dict | None) -> ConfigParser:
    """Parse ``bundle_root/configs/<configs...>`` (merged in order), then apply ``overrides``."""
    paths = [os.path.join(bundle_root, "configs", c) for c in configs]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"bundle config file(s) not found: {missing}")
    parser = ConfigParser()
    parser.read_config(paths)
    parser["bundle_root"] = bundle_root
    for k, v in {**DEFAULT_OVERRIDES, **(overrides or {})}.items():
        parser[k] = v
    return parser


class BraTSBundleInfer(BasicInferTask):
    """``POST /infer/<model>``: the bundle's inference pipeline on one 4D MSD NIfTI study."""

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
        self.parser = load_bundle_config(self.bundle_root, self.configs, self.overrides)
        self._lock = threading.RLock()

        model_path = os.path.abspath(model_path or os.path.join(self.bundle_root, "models", "model.pt"))
        self.model_path = model_path
        self.has_weights = os.path.isfile(model_path)

        network = self.parser.get_parsed_content("network_def", instantiate=True)
        convention = self.parser.get_parsed_content("label_convention")
        labels = {name: int(value) for value, name in sorted(convention.names.items())}

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
            config={
                "bundle_root": self.bundle_root,
                "bundle_configs": ",".join(self.configs),
                "model_path": model_path,
                "weights": "present" if self.has_weights else "missing",
                "label_convention": convention.name,
                "input": "one 4D NIfTI (H, W, D, 4), MSD channel order FLAIR, T1w, t1gd, T2w",
            },
            **kwargs,
        )

    def is_valid(self) -> bool:
        # Listed in /info even without weights (the description/config say so); inference refuses.
        return True

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["version"] = self.version
        return i

    def __call__(self, request, callbacks=None):
        with self._lock:
            return super().__call__(request, callbacks)

    def _get_network(self, device, data):
        self.has_weights = os.path.isfile(self.model_path)
        if not self.has_weights:
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR,
                f"No model weights at {self.model_path}: train the bundle or pass --conf model_path PATH",
            )
        return super()._get_network(device, data)

    def _transforms(self, key: str) -> list:
        c = self.parser.get_parsed_content(key, instantiate=True)
        return list(c.transforms) if isinstance(c, Compose) else list(c)

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return self._transforms("preprocessing")

    def run_pre_transforms(self, data, transforms):
        # BasicInferTask puts the study path under "image_path"; MONAI 1.6's Spacingd then calls
        # .update() on every "image_*" key of the dict and fails on that str. Hide it meanwhile
        # (the writer needs it afterwards for the output file's extension).
        image_path = data.pop("image_path", None)
        data = super().run_pre_transforms(data, transforms)
        if image_path is not None:
            data["image_path"] = image_path
        return data

    def inferer(self, data=None) -> Inferer:
        return self.parser.get_parsed_content("inferer", instantiate=True)

    def writer(self, data, extension=None, dtype=None):
        """MONAI Label's writer, plus the predicted region volumes in mL (``volumes_ml``: TC, WT, ET)."""
        result_file, result_json = super().writer(data, extension=extension, dtype=dtype)
        pred = data["pred"]
        affine = pred.affine if hasattr(pred, "affine") else np.eye(4)
        convention = self.parser.get_parsed_content("label_convention")
        return result_file, {**(result_json or {}), "volumes_ml": region_volumes_ml(pred, affine, convention)}

    def post_transforms(self, data=None) -> Sequence[Callable]:
        post = [t for t in self._transforms("postprocessing") if not isinstance(t, SaveImaged)]
        # (1, H, W, D) label map in the image's grid -> (H, W, D) uint8 for MONAI Label's writer.
        return post + [SqueezeDimd(keys="pred", dim=0), CastToTyped(keys="pred", dtype=np.uint8)]
