"""Additions to MONAI's built-in MLflow tracking (``monai.bundle run ... --tracking mlflow``).

``--tracking mlflow`` appends a ``monai.handlers.MLFlowHandler`` to ``train#handlers`` and
``validate#handlers``; the configs pass those lists through :func:`configure_mlflow`, which gives
the handlers this project's run parameters and artifacts and makes tracking failures non-fatal
(logged as warnings; training goes on). Without ``--tracking`` the lists pass through unchanged.

Resumed training (``--resume true`` after a crash or a SIGKILL) continues the same MLflow run:
``train.json``'s ``run_name`` is :func:`run_name`, which reuses the name saved beside the
checkpoints, and MONAI's handler continues the unfinished run of that name; parameters that the
resumed command changes (e.g. ``epochs``) are recorded as ``resumed.<name>`` tags, since MLflow
refuses to change a logged parameter.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.handlers import MLFlowHandler

from custom.atomic_files import atomic_write

logger = logging.getLogger(__name__)
_MLFLOW_METHODS = ("start", "iteration_completed", "epoch_completed", "complete", "close")


def _tolerant(handler: MLFlowHandler, method, name: str):
    """Wrap ``method`` so that an exception is logged once and the handler then goes quiet (an
    unreachable server would otherwise cost its retry time at every later call)."""

    @functools.wraps(method)
    def call(*args, **kwargs):
        if getattr(handler, "_tracking_failed", False):
            return None
        try:
            return method(*args, **kwargs)
        except Exception as e:  # tracking must never stop training
            handler._tracking_failed = True
            logger.warning(f"MLflow tracking failed in {name} ({type(e).__name__}: {e}); training continues without tracking")
            return None

    return call


def configure_mlflow(handlers: Sequence | None, params: dict | None = None, artifacts: Sequence[str] = ()) -> list:
    """Return ``handlers`` with every ``MLFlowHandler`` in it made fault-tolerant.

    ``params`` (nested dicts are flattened with ``.``) are logged when the run starts; ``artifacts``
    (file or folder paths) are logged when the engine completes, with the handler's own.
    """
    handlers = list(handlers or [])
    for h in handlers:
        if not isinstance(h, MLFlowHandler):
            continue
        if params:
            h.experiment_param = {**(h.experiment_param or {}), **flatten(params)}
        if artifacts:
            existing = [a for a in (h.artifacts or []) if a]
            h.artifacts = [*existing, *artifacts]
        h._log_params = _log_new_params(h, h._log_params)
        for name in _MLFLOW_METHODS:
            setattr(h, name, _tolerant(h, getattr(h, name), name))
    return handlers


def _log_new_params(handler: MLFlowHandler, log_params):
    """``MLFlowHandler._log_params`` for a run that may be a resumed one: parameters already logged
    are not logged again, and those whose value changed become ``resumed.<key>`` tags (MLflow raises
    on a changed parameter, which would switch tracking off for the rest of the training)."""

    @functools.wraps(log_params)
    def log(params: dict) -> None:
        if handler.cur_run is None:
            return log_params(params)
        logged = handler.client.get_run(handler.cur_run.info.run_id).data.params
        if not logged:
            return log_params(params)
        new = {k: v for k, v in params.items() if k not in logged}
        changed = {k: str(v) for k, v in params.items() if k in logged and logged[k] != str(v)}
        for k, v in changed.items():
            handler.client.set_tag(handler.cur_run.info.run_id, f"resumed.{k}", v[:5000])
        if changed:
            logger.info(f"MLflow run {handler.cur_run.info.run_id} continued; changed parameters kept as resumed.* tags: {sorted(changed)}")
        if new:
            log_params(new)

    return log


RUN_NAME_FILE = "mlflow_run_name"


def run_name(ckpt_dir: str | os.PathLike, resume_path: str | None = None, save: bool = True) -> str:
    """The MLflow run name of a training, kept in ``<ckpt_dir>/mlflow_run_name``.

    MONAI's ``MLFlowHandler`` continues the newest unfinished run with its ``run_name`` or creates
    one. A training resumed from a checkpoint (``resume_path`` set) reuses the saved name, so the
    run left ``RUNNING`` by a killed training is continued rather than duplicated; a fresh training
    gets (and saves) a new name. Without a name the handler would attach to *any* unfinished run of
    the experiment, e.g. one of an unrelated killed training. ``save=False`` (evaluation): a new name,
    not saved (the training's stays).
    """
    path = Path(ckpt_dir) / RUN_NAME_FILE
    if resume_path and path.is_file():
        name = path.read_text().strip()
        if name:
            return name
    name = f"run_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:8]}"
    if save and int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 tracks
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, name + "\n")
    return name


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict -> flat dict with dotted keys (MONAI's ``flatten_dict`` drops the parent keys)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def describe_network(net: torch.nn.Module) -> dict:
    """Class name, parameter count and the hyper-parameters a network records about itself."""
    info = {"class": type(net).__name__, "parameters": sum(p.numel() for p in net.parameters())}
    for attr in ("feature_size", "spatial_attention", "squeeze_excitation", "dropout_prob", "channels", "strides"):
        if hasattr(net, attr):
            info[attr] = getattr(net, attr)
    return info


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """The current git commit of the project (``unknown`` outside a git checkout)."""
    repo = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
