"""MONAI Label app serving the repo's BraTS MONAI Bundle.

Start (the venv's bin first on PATH: the ``monailabel`` launcher runs ``python`` from PATH)::

    PATH=$PWD/.venv/bin:$PATH monailabel start_server --app monailabel_app --studies STUDIES \
        --host 127.0.0.1 --conf models brats [--conf bundle_root PATH] [--conf model_path PATH] \
        [--conf bundle_configs inference.json,quick.json] [--conf bundle_overrides '{"use_crf":false}']

``STUDIES``: a flat folder of 4D NIfTI images, or a BraTS 2021 / 2023 / MSD Task01 dataset folder.
README.md lists every ``--conf`` option.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Dict

APP_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(APP_DIR)

import monailabel  # noqa: E402
from fastapi import HTTPException  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import Datastore  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.scoring import ScoringMethod  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402
from monailabel.tasks.activelearning.epistemic import Epistemic  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402

from lib.datastore import open_datastore  # noqa: E402
from lib.infers import BraTSBundleInfer  # noqa: E402
from lib.params import truthy  # noqa: E402
from lib.scoring import EpistemicMCDropoutScoring  # noqa: E402
from lib.security import harden_server, request_has_upload  # noqa: E402
from lib.trainers import BraTSBundleTrain  # noqa: E402

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
    configs = [c.strip() for c in conf.get("bundle_configs", "inference.json").split(",") if c.strip()]
    extra = [c for c in configs if c != "inference.json"]
    train_configs = [c.strip() for c in conf.get("train_configs", ",".join(["train.json", *extra])).split(",") if c.strip()]
    fine_tune_configs = [c.strip() for c in conf.get("fine_tune_configs", "fine_tune.json").split(",") if c.strip()]
    try:
        mc_samples = int(conf.get("mc_samples", 8))
    except ValueError as e:
        raise ValueError(f"--conf mc_samples must be an integer: {e}") from e
    return {
        "models": models,
        "bundle_root": os.path.abspath(conf.get("bundle_root") or os.path.join(REPO_ROOT, "bundle")),
        "model_path": conf.get("model_path") or None,
        "configs": configs,
        "train_configs": train_configs,
        "fine_tune_configs": fine_tune_configs,
        "overrides": overrides,
        "mc_samples": mc_samples,
        "auto_update_scoring": truthy(conf.get("auto_update_scoring", False), "auto_update_scoring"),
    }


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.options = parse_conf(conf)
        self.options.update(harden_server(conf))  # upload limit, id guard, no sessions/model uploads, token check (lib/security.py)
        self.layout = None
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="BraTS brain tumour segmentation (MONAI Bundle)",
            description="Swin-UNETR + attention/SE from the repo's MONAI Bundle; studies are BraTS cases (4 MRI modalities)",
            version=monailabel.__version__,
        )
        # MONAI Label re-scores every image at start-up and after each /activelearning call unless told
        # not to; MC-dropout scoring of a whole dataset is minutes of CPU, so it is opt-in here.
        self._auto_update_scoring = self.options["auto_update_scoring"]

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            if settings.MONAI_LABEL_DATASTORE.lower() not in ("", "dicomweb"):  # xnat, dsa: MONAI Label's own
                return super().init_datastore()
            from lib.datastore.dicomweb import open_dicomweb_datastore  # a PACS: one image = a study's 4 MR series

            datastore, self.layout = open_dicomweb_datastore(self.studies, self.conf)
            return datastore
        datastore, self.layout = open_datastore(
            self.studies,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )
        logger.info(f"Studies {self.studies}: {type(datastore).__name__}, {self.layout.name} layout, {len(datastore.list_images())} images")
        return datastore

    def _overrides(self) -> dict:
        """Bundle overrides: the studies' layout (channel order, label convention), then the user's."""
        layout = {}
        if self.layout is not None:
            layout = {"layout": f"$brats.Layout({self.layout.name!r}, {self.layout.suffixes!r}, {self.layout.separator!r}, "
                                f"{tuple(self.layout.channel_index)!r})"}
        return {**layout, **self.options["overrides"]}

    def init_infers(self) -> Dict[str, InferTask]:
        o = self.options
        infers: Dict[str, InferTask] = {}
        if "brats" in o["models"]:
            task = BraTSBundleInfer(o["bundle_root"], o["configs"], self._overrides(), o["model_path"])
            if not task.has_weights:
                logger.warning(f"Model 'brats': no weights at {task.model_path}; listed in /info, inference refused until trained")
            infers["brats"] = task
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        o = self.options
        if "brats" not in o["models"]:
            return {}
        return {"brats": BraTSBundleTrain(o["bundle_root"], o["train_configs"], self._overrides(), o["model_path"],
                                           fine_tune_configs=o["fine_tune_configs"])}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {
            "random": Random(),
            "first": First(),
            "epistemic": Epistemic(key="epistemic_entropy", desc="Unlabelled image with the highest MC-dropout epistemic uncertainty"),
        }

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        task = self._infers.get("brats")
        return {"epistemic": EpistemicMCDropoutScoring(task, self.options["mc_samples"])} if task else {}

    def next_sample(self, request):
        """MONAI Label's ``next_sample``; an unknown strategy is HTTP 404 naming the available ones."""
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(status_code=404, detail=f"unknown strategy {str(strategy)[:80]!r}; this server has {sorted(self._strategies)}")
        return super().next_sample(request)

    def infer(self, request, datastore=None):
        """MONAI Label's ``infer``, with the image id checked (HTTP 400/404) and resolved to the case's
        network input (a 4D NIfTI or the modality files of a BraTS case folder, with the names of the
        sequences present: a case may lack some, see ``custom.data.REQUIRED_ANY``)."""
        datastore = datastore or self.datastore()
        request = {k: v for k, v in request.items() if k != "sequences"}  # set from the datastore below, never by the client
        image = request.get("image")
        if (request_has_upload() and isinstance(image, str) and os.path.isfile(image)
                and os.path.dirname(os.path.realpath(image)) == os.path.realpath(tempfile.gettempdir())):
            return super().infer(request, datastore)  # a file uploaded with the request (stored by the endpoint in the temp dir)
        if not hasattr(datastore, "model_input"):  # MONAI Label's own remote datastores (XNAT, DSA)
            return super().infer(request, datastore)
        image_id = datastore.require_image(image)
        model_input = datastore.model_input(image_id)
        gone = [f for f in ([model_input] if isinstance(model_input, str) else model_input) if not os.path.isfile(f)]
        if gone:
            raise HTTPException(status_code=404, detail=f"image {image_id!r}: its file(s) are no longer on the server's disk "
                                                        f"({', '.join(os.path.basename(f) for f in gone)}); add the image again")
        sequences = datastore.model_sequences(image_id)  # those present; the bundle's loader zero-fills the others
        save_label = truthy(request.get("save_label", False), "save_label")
        result = super().infer({**request, "image": model_input, "sequences": sequences, "save_label": False}, datastore)
        on_image = getattr(datastore, "result_on_image", None)  # a study prepared from series on different grids
        if on_image and result.get("file"):
            mapped = on_image(image_id, result["file"], continuous=bool(result["params"].get("uncertainty")))
            if mapped != result["file"]:
                os.remove(result["file"])
                result["file"] = mapped
        if save_label and result.get("file") and not result["params"].get("uncertainty"):
            tag = request.get("label_tag", "original")
            result["label"] = datastore.save_label(image_id, result["file"], tag, {"model": request.get("model")})
            result["tag"] = tag
        return result
