"""``POST /scoring/epistemic``: Monte-Carlo-dropout epistemic uncertainty of every unlabelled image.

For each image without a ``final`` label, the inference task runs the bundle's pre-processing and
sliding-window inferer once with ``mc_samples`` dropout draws of the output layer
(``SwinUNETRAttSE.forward_mc``) and averages the voxel-wise mutual information (nats, summed over
TC/WT/ET) over the brain (voxels where any MRI channel is non-zero, pre-processed grid). The score
is stored in the image's datastore info as ``epistemic_entropy`` (the key MONAI Label's
``Epistemic`` strategy ranks by), with ``epistemic_predictive_entropy``, ``epistemic_samples`` and
``epistemic_ts`` (the weights' modification time: images already scored with the same weights
and sample count are skipped unless the request says ``force``).
"""

from __future__ import annotations

import logging
import os
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.utils.others.generic import name_to_device

from lib.params import mc_samples, truthy

logger = logging.getLogger(__name__)


class EpistemicMCDropoutScoring(ScoringMethod):
    def __init__(self, infer_task, mc_samples: int = 8):
        super().__init__("MC-dropout epistemic uncertainty (mutual information) of each unlabelled image")
        self.infer_task = infer_task
        self.mc_samples = mc_samples

    def info(self):
        return {**super().info(), "config": {"mc_samples": self.mc_samples, "force": False}}

    def __call__(self, request, datastore: Datastore):
        samples = mc_samples(request.get("mc_samples", self.mc_samples))
        force = truthy(request.get("force", False), "force")
        device = name_to_device(request.get("device", "cuda"))
        if not os.path.isfile(self.infer_task.model_path):
            raise MONAILabelException(MONAILabelError.APP_ERROR, f"No model weights at {self.infer_task.model_path}: nothing to score with")
        model_ts = int(os.stat(self.infer_task.model_path).st_mtime)

        scored, skipped = {}, []
        for image_id in datastore.get_unlabeled_images():
            info = datastore.get_image_info(image_id)
            if not force and info.get("epistemic_ts") == model_ts and info.get("epistemic_samples") == samples:
                skipped.append(image_id)
                continue
            start = time.time()
            sequences = datastore.model_sequences(image_id) if hasattr(datastore, "model_sequences") else None
            score = self.infer_task.epistemic_score(datastore.model_input(image_id), device, samples, sequences)
            datastore.update_image_info(
                image_id,
                {
                    "epistemic_entropy": score["mutual_information"],
                    "epistemic_predictive_entropy": score["predictive_entropy"],
                    "epistemic_samples": samples,
                    "epistemic_ts": model_ts,
                },
            )
            scored[image_id] = score["mutual_information"]
            logger.info(f"EPISTEMIC:: {image_id}: mutual information {score['mutual_information']:.5f} nats ({time.time() - start:.1f} s)")
        return {"scored": scored, "skipped": skipped, "mc_samples": samples, "model_ts": model_ts}
