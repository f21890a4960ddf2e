"""Train task (``POST /train/<model>``) fine-tuning through the bundle's own training workflow.

The run is ``bundle/configs/train.json`` (plus the app's extra configs such as ``quick.json``)
executed by ``monai.bundle``; this module only computes overrides for it:

- the datastore's labelled images (final labels) split into ``train_datalist`` / ``val_datalist``
  (also set as ``train#dataset#data`` / ``validate#dataset#data``);
- ``epochs`` (the trainer's ``max_epochs`` and the lr schedule) from the request, ``val_interval``
  capped at it so at least one validation runs: the bundle's ``validate#best_model_saver`` then
  replaces the served weights (``model_path``, written atomically) on the best validation Dice;
- ``iterations_per_epoch`` (the trainer's ``epoch_length`` and the lr schedule; null: one pass over
  the training cases) from the request, so that a few labelled studies train as long as many;
- ``pretrained``: a ``custom.handlers.checkpoints.CheckedCheckpointLoader`` of the current ``model_path``
  prepended to ``train#handlers``; weights that do not fit the configured network are refused before
  the run starts (``WeightsMismatchError`` naming both);
- MLflow as ``python -m monai.bundle run --tracking mlflow`` does it (``tracking`` argument and the
  top-level ids ``tracking_uri``, ``experiment_name``, ``run_name``).

One process: ``monai.bundle.run`` in-process. ``multi_gpu``: the merged config is exported to a
temporary file and run by ``torchrun -m monai.bundle run`` with the bundle's
``multi_gpu_train.json`` (nccl on CUDA; gloo on CPU with ``num_processes`` processes, so the path
runs without GPUs too); the children's output is streamed to stdout and a failure raises.

MONAI Label's ``BundleTrainTask.__call__`` is not used: it overrides ``train#trainer#max_epochs``
only (the bundle's lr schedule reads ``epochs``), writes its merged config into the bundle folder,
ignores a failing torchrun, and decides multi-GPU from ``gpus`` after the server has rewritten it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
from collections import deque
from typing import Any, Sequence

import monai.bundle
import torch
from monai.bundle import ConfigParser
from monailabel.config import settings
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import name_to_device

from custom.handlers.checkpoints import WeightsMismatchError, check_weights
from lib.bundle_config import DEFAULT_OVERRIDES, load_bundle_config
from lib.params import truthy

logger = logging.getLogger(__name__)

_EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[A-Za-z_][\w.]*)?(?:Error|Exception): .*)$")

def iterations_per_epoch(value: Any) -> int | None:
    """A request's ``iterations_per_epoch``: an integer >= 1 (a JSON number or digits), or None for one
    pass over the training cases an epoch (null, empty, "none" or "null"); ValueError otherwise."""
    text = value.strip() if isinstance(value, str) else None
    if value is None or (text is not None and text.lower() in ("", "none", "null")):
        return None
    number = value
    if text is not None and text.isascii() and text.isdigit():
        number = int(text)
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"iterations_per_epoch must be an integer >= 1, or empty/null for one pass over the training cases, "
                         f"got {value!r}")
    return number


def _first(image: str | Sequence[str]) -> str:
    return image if isinstance(image, str) else image[0]


def split_datalist(datalist: list[dict], val_split: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split: sorted by image, shuffled with ``seed``; at least one
    case on each side (ValueError for fewer than 2 cases)."""
    if len(datalist) < 2:
        raise ValueError(f"training needs at least 2 labelled images (final labels) in the datastore, found {len(datalist)}")
    items = sorted(datalist, key=lambda d: json.dumps(d["image"]))
    random.Random(seed).shuffle(items)
    n_val = min(len(items) - 1, max(1, round(float(val_split) * len(items))))
    return items[n_val:], items[:n_val]


class BraTSBundleTrain(BundleTrainTask):
    """``POST /train/<model>``: fine-tune the bundle's network on the datastore's labelled studies.

    Args:
        bundle_root: the bundle folder (``configs/``, ``models/``).
        configs: file names in ``<bundle_root>/configs/`` merged in order (``train.json`` first).
        fine_tune_configs: merged after ``configs`` when a run starts from the served weights
            (``pretrained``, the default, and a file at ``model_path``): the bundle's fine-tuning
            recipe (``fine_tune.json``: a fixed number of iterations, a low learning rate, no warm-up).
        overrides: config id -> value applied after them (the app's ``layout``, quick-size settings...).
        model_path: the weights the inference task serves (default ``<bundle_root>/models/model.pt``);
            the best validation model of a run is written there.
        description: shown in ``/info``; default the bundle's description.
        enable_tracking: MLflow on by default (when the server's ``MONAI_LABEL_TRACKING_ENABLED``).
        load_strict: ``pretrained`` weights must match the configured network exactly.
    """

    def __init__(
        self,
        bundle_root: str,
        configs: Sequence[str] = ("train.json",),
        overrides: dict | None = None,
        model_path: str | None = None,
        description: str | None = None,
        enable_tracking: bool = True,
        load_strict: bool = True,
        fine_tune_configs: Sequence[str] = ("fine_tune.json",),
    ):
        self.bundle_root = os.path.abspath(bundle_root)
        self.configs = list(configs)
        self.fine_tune_configs = list(fine_tune_configs)
        self.overrides = {**DEFAULT_OVERRIDES, **(overrides or {})}
        self.model_path = os.path.abspath(model_path or os.path.join(self.bundle_root, "models", "model.pt"))
        # raises if a file is missing; the options shown are those of the run a request starts now
        parser = load_bundle_config(self.bundle_root, self.run_configs(os.path.isfile(self.model_path)), self.overrides)
        super().__init__(self.bundle_root, conf={}, enable_tracking=enable_tracking, load_strict=load_strict)
        self.bundle_config = parser
        if description:
            self.description = description

    def run_configs(self, fine_tune: bool) -> list[str]:
        """The config files of a run: ``configs``, then ``fine_tune_configs`` when it starts from the served weights."""
        return [*self.configs, *(self.fine_tune_configs if fine_tune else [])]

    def config(self) -> dict[str, Any]:
        options = super().config()
        for key in ("model_filename", "run_id"):  # the run is always "run"; the weights are model_path
            options.pop(key, None)
        options["max_epochs"] = int(self.bundle_config.get_parsed_content("epochs"))
        # None: one pass over the training cases an epoch
        options["iterations_per_epoch"] = iterations_per_epoch(self.bundle_config.get_parsed_content("iterations_per_epoch"))
        options["multi_gpu"] = torch.cuda.device_count() > 1
        options["num_processes"] = 2  # processes (gloo) for multi_gpu on a machine without CUDA
        return options

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        logger.info(f"Train request: {request}")
        # "sequences": the sequences a case has (absent: all four); the bundle's loader zero-fills the others
        datalist = [{k: d[k] for k in ("image", "label", "sequences") if k in d} for d in datastore.datalist() if d and d.get("label")]
        train_ds, val_ds = split_datalist(datalist, request.get("val_split", 0.2))
        fine_tune = truthy(request.get("pretrained", True), "pretrained") and os.path.isfile(self.model_path)
        configs = self.run_configs(fine_tune)
        parser = load_bundle_config(self.bundle_root, configs, self.overrides)
        epochs = request.get("max_epochs")
        epochs = int(parser.get_parsed_content("epochs") if epochs in (None, "") else epochs)
        if epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {epochs}")
        # absent: the bundle's value (quick.json: a fixed number, so a few studies train as long as many)
        iterations = iterations_per_epoch(request["iterations_per_epoch"] if "iterations_per_epoch" in request
                                          else parser.get_parsed_content("iterations_per_epoch"))
        val_interval = int(parser.get_parsed_content("val_interval"))
        device = name_to_device(request.get("device"))

        overrides = {
            **self.overrides,
            "bundle_root": self.bundle_root,
            "ckpt_dir": os.path.dirname(self.model_path),
            "ckpt_path": self.model_path,
            "validate#best_model_saver#key_metric_filename": os.path.basename(self.model_path),
            "dataset_dir": getattr(datastore, "_datastore_path", None) or os.path.dirname(_first(train_ds[0]["image"])),
            "train_datalist": train_ds,
            "val_datalist": val_ds,
            "train#dataset#data": train_ds,
            "validate#dataset#data": val_ds,
            "epochs": epochs,
            "train#trainer#max_epochs": epochs,
            "iterations_per_epoch": iterations,
            "val_interval": max(1, min(val_interval, epochs)),
            "device": f"$torch.device({str(device)!r})",  # an expression: the config is exported as JSON
        }
        # at most epochs - 1 warm-up epochs (the fine-tuning recipe has none: a short warm-up from a
        # learning rate of 0 would barely move the trained weights)
        overrides["warmup_epochs"] = min(int(parser.get_parsed_content("warmup_epochs")), epochs - 1)
        if fine_tune:
            logger.info(f"Fine-tuning from {self.model_path}")
            try:  # before any data is cached; the loader checks again when the run starts
                check_weights(self.model_path, parser.get_parsed_content("network_def"), parser.get_parsed_content("network_settings"),
                              strict=self.load_strict, logger=logger)
            except WeightsMismatchError as e:
                raise WeightsMismatchError(f"{e}; or train from scratch with pretrained false") from None
            loader = {"_target_": "custom.handlers.checkpoints.CheckedCheckpointLoader", "load_path": self.model_path,
                      "load_dict": {"model": "@network"}, "network_settings": "@network_settings", "map_location": "@device",
                      "strict": self.load_strict}
            overrides["train#handlers"] = [loader, *copy.deepcopy(parser.get("train#handlers") or [])]

        tracking = request.get("tracking", "mlflow" if self.enable_tracking and settings.MONAI_LABEL_TRACKING_ENABLED else None)
        tracking = tracking[0] if isinstance(tracking, (list, tuple)) else tracking
        tracking = None if not tracking or str(tracking).lower() == "none" else str(tracking).lower()
        if tracking not in (None, "mlflow"):
            raise ValueError(f"tracking must be 'mlflow' or 'None', got {tracking!r}")
        if tracking:
            uri = request.get("tracking_uri") or settings.MONAI_LABEL_TRACKING_URI
            if uri:  # else the bundle's default: SQLite under <output_dir>
                overrides["tracking_uri"] = uri
            overrides["experiment_name"] = request.get("tracking_experiment_name") or request.get("model") or "brats"
            if request.get("tracking_run_name"):
                overrides["run_name"] = request["tracking_run_name"]

        paths = [os.path.join(self.bundle_root, "configs", c) for c in configs]
        meta_file = os.path.join(self.bundle_root, "configs", "metadata.json")
        logging_file = os.path.join(self.bundle_root, "configs", "logging.conf")
        n_proc = self._num_processes(request) if truthy(request.get("multi_gpu", False), "multi_gpu") else 1
        if n_proc > len(train_ds):  # every process needs a training case of its own
            logger.warning(f"{len(train_ds)} training case(s): {len(train_ds)} process(es) instead of {n_proc}")
            n_proc = len(train_ds)
        logger.info(f"Training {len(train_ds)} cases, validating {len(val_ds)}, {epochs} epoch(s) of "
                    f"{f'{iterations} iterations' if iterations else 'one pass'}, "
                    f"{n_proc} process(es), device {device}, tracking {tracking}")
        if n_proc > 1:
            self._run_torchrun(n_proc, paths, overrides, meta_file, logging_file, tracking, request)
        else:
            # monai.bundle.run drops None arguments: a null override (iterations_per_epoch) goes as the expression "$None"
            monai.bundle.run(run_id="run", config_file=paths, meta_file=meta_file, logging_file=logging_file,
                             tracking=tracking, **{k: "$None" if v is None else v for k, v in overrides.items()})
        logger.info("Training finished")
        return {"model_path": self.model_path, "train": len(train_ds), "validation": len(val_ds), "epochs": epochs,
                "iterations_per_epoch": iterations,
                "multi_gpu": n_proc > 1, "processes": n_proc}

    @staticmethod
    def _num_processes(request: dict) -> int:
        if not torch.cuda.is_available():
            return int(request.get("num_processes", 2))
        gpus = str(request.get("gpus") or "all")
        # the server has already applied a gpus list as CUDA_VISIBLE_DEVICES (and rewritten it to "all")
        return torch.cuda.device_count() if gpus == "all" else len([g for g in gpus.split(",") if g.strip()])

    def _run_torchrun(self, n_proc, paths, overrides, meta_file, logging_file, tracking, request) -> None:
        multi_gpu_config = os.path.join(self.bundle_root, "configs", "multi_gpu_train.json")
        parser = ConfigParser()
        parser.read_config(paths)
        for k, v in overrides.items():
            parser[k] = v
        fd, merged = tempfile.mkstemp(prefix="brats_train_", suffix=".json")  # outside the bundle folder
        os.close(fd)
        try:
            ConfigParser.export_config_file(parser.get(), merged, indent=2)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={n_proc}",
                   "-m", "monai.bundle", "run", "run", "--config_file", json.dumps([merged, multi_gpu_config]),
                   "--meta_file", meta_file, "--logging_file", logging_file]
            if tracking:
                cmd += ["--tracking", tracking]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
            # the children import what this process imports (the repo's ``custom`` package, the bundle)
            env["PYTHONPATH"] = os.pathsep.join([self.bundle_root, *[p for p in sys.path if p and os.path.isdir(p)],
                                                 env.get("PYTHONPATH", "")])
            gpus = str(request.get("gpus") or "all")
            if torch.cuda.is_available() and gpus != "all":
                env["CUDA_VISIBLE_DEVICES"] = gpus
            logger.info(f"Running: {' '.join(cmd)}")
            tail: deque[str] = deque(maxlen=30)
            errors: list[str] = []  # the children's exception messages (torchrun's own summary hides them)
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
                for line in proc.stdout:
                    line = line.rstrip()
                    print(line, flush=True)
                    tail.append(line)
                    m = _EXCEPTION_LINE.match(line)
                    if m and "ChildFailedError" not in line and m.group(1) not in errors:
                        errors.append(m.group(1))
                code = proc.wait()
            if code != 0:
                raise RuntimeError(f"multi-process training failed (torchrun exit code {code}): "
                                   + ("\n".join(errors[:5]) or "no exception message seen")
                                   + "\n--- last output ---\n" + "\n".join(tail))
        finally:
            os.remove(merged)
