"""MONAI Label app serving the repo's BraTS MONAI Bundle.

Start (the venv's bin first on PATH: the ``monailabel`` launcher runs ``python`` from PATH)::

    PATH=$PWD/.venv/bin:$PATH monailabel start_server --app monailabel_app --studies STUDIES \
        --conf models brats [--conf bundle_root PATH] [--conf model_path PATH] \
        [--conf bundle_configs inference.json,quick.json] [--conf bundle_overrides '{"use_crf": false}']

See README.md for the options.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Dict

APP_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(APP_DIR)
if REPO_ROOT not in sys.path:  # the bundle's config imports the repo's ``custom`` package
    sys.path.insert(0, REPO_ROOT)

import monailabel  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402

from lib.infers import BraTSBundleInfer  # noqa: E402

logger = logging.getLogger(__name__)

KNOWN_MODELS = ("brats",)


def parse_conf(conf: Dict[str, str]) -> dict:
    """The app's ``--conf`` options, validated (raises ValueError with a readable message)."""
    models = [m.strip() for m in conf.get("models", "brats").split(",") if m.strip()]
    unknown = [m for m in models if m not in KNOWN_MODELS]
    if unknown:
        raise ValueError(f"--conf models: unknown model(s) {unknown}; available: {list(KNOWN_MODELS)}")
    overrides_text = conf.get("bundle_overrides", "").strip()
    try:
        overrides = json.loads(overrides_text) if overrides_text else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--conf bundle_overrides must be a JSON object: {e}") from e
    if not isinstance(overrides, dict):
        raise ValueError("--conf bundle_overrides must be a JSON object of config id -> value")
    return {
        "models": models,
        "bundle_root": os.path.abspath(conf.get("bundle_root") or os.path.join(REPO_ROOT, "bundle")),
        "model_path": conf.get("model_path") or None,
        "configs": [c.strip() for c in conf.get("bundle_configs", "inference.json").split(",") if c.strip()],
        "overrides": overrides,
    }


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.options = parse_conf(conf)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="BraTS brain tumour segmentation (MONAI Bundle)",
            description="Serves the repo's bundle; studies are 4D MSD NIfTI (FLAIR, T1w, t1gd, T2w)",
            version=monailabel.__version__,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        o = self.options
        infers: Dict[str, InferTask] = {}
        if "brats" in o["models"]:
            task = BraTSBundleInfer(o["bundle_root"], o["configs"], o["overrides"], o["model_path"])
            if not task.has_weights:
                logger.warning(f"Model 'brats': no weights at {task.model_path}; listed in /info, inference refused")
            infers["brats"] = task
        return infers
