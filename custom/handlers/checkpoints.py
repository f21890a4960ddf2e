"""Checkpoint files of the bundle: written atomically, with the network settings they were trained with,
and refused at load when they do not fit the configured network."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn


def latest(ckpt_dir: str | os.PathLike, prefix: str = "resume") -> str | None:
    """Path of the newest ``<prefix>_*=<N>.pt`` in ``ckpt_dir`` (highest N), or None.

    MONAI's ``CheckpointSaver`` names interval checkpoints ``<prefix>_checkpoint_epoch=<N>.pt`` and
    writes them atomically (temporary file, then rename), so a listed file is always complete.
    """
    pattern = re.compile(re.escape(prefix) + r"_.*=(\d+)\.pt$")
    found = []
    for p in Path(ckpt_dir).glob(f"{prefix}_*.pt") if Path(ckpt_dir).is_dir() else []:
        m = pattern.match(p.name)
        if m:
            found.append((int(m.group(1)), str(p)))
    return max(found)[1] if found else None


class AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` that writes to a temporary file and renames it (never a half-written
    checkpoint), optionally under a fixed file name like MONAI's own saver."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        # A fixed name (e.g. the best model.pt) is replaced atomically by the next save: removing it
        # first would leave a moment without the file (a server reading it would find no weights).
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files are written atomically.

    MONAI writes in place (``atomic=False``, for file permissions that ignite now sets itself), so
    a process killed mid-save leaves a truncated ``.pt``; here every save goes through
    :class:`AtomicDiskSaver`. Interval checkpoints also hold the saver's own list of saved files
    (key ``checkpointer``; load it into :attr:`interval_checkpoint` on resume) so that a resumed
    run keeps pruning to ``n_saved`` files. Same arguments as ``CheckpointSaver``.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        fixed = {"_final_checkpoint": kwargs.get("final_filename"), "_key_metric_checkpoint": kwargs.get("key_metric_filename")}
        for name in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            checkpoint = getattr(self, name)
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, fixed.get(name))
        if self._interval_checkpoint is not None:
            self._interval_checkpoint.include_self = True

    @property
    def interval_checkpoint(self):
        """The ignite ``Checkpoint`` behind interval saves (its ``state_dict`` lists the saved files)."""
        return self._interval_checkpoint


# ------------------------------------------------------------------------------- network settings

SETTINGS_KEY = "network"  # checkpoint key of the settings dict, next to "model"
RECORD_FILE = "model.json"  # record beside exported weights (tools/export_weights.py)
_EXAMPLES = 3  # keys named per kind of difference in a message


class WeightsMismatchError(ValueError):
    """Weights that do not fit the configured network; the message names both."""


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network


def network_class(network: nn.Module) -> str:
    """Dotted class path of ``network`` (unwrapped from (Distributed)DataParallel) through the shortest
    package that exports it, e.g. ``custom.networks.SwinUNETRAttSE``, ``monai.networks.nets.UNet``."""
    cls = type(_unwrap(network))
    parts = cls.__module__.split(".")
    for k in range(1, len(parts) + 1):
        prefix = ".".join(parts[:k])
        if getattr(sys.modules.get(prefix), cls.__qualname__, None) is cls:
            return f"{prefix}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain(value):
    """JSON-like copy (tuples become lists) so that recorded and configured values compare equal."""
    return json.loads(json.dumps(value))


class NetworkRecord:
    """Save-dict entry that stores the network settings with the weights (``CheckpointSaver`` saves
    ``state_dict()`` of every entry): ``{"_target_": <class path of network>, **settings}``, e.g.
    ``feature_size``, ``depths``, ``spacing`` (mm). ``settings`` must be JSON-serialisable."""

    def __init__(self, network: nn.Module, settings: Mapping[str, Any]) -> None:
        self.network = network
        self.settings = _plain(dict(settings))

    def state_dict(self) -> dict:
        return {"_target_": network_class(self.network), **self.settings}


def read_checkpoint(path: str | os.PathLike):
    """``torch.load`` of ``path`` on the CPU, memory-mapped where the file format allows (tensor data
    is then only read when used: checking keys and shapes costs no copy of the weights)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recorded_settings(path: str | os.PathLike, checkpoint) -> tuple[dict | None, str]:
    """Network settings recorded with the weights at ``path``, and where they were found.

    ``checkpoint[SETTINGS_KEY]`` when the checkpoint holds a settings dict next to its weights, else
    the ``network`` of a ``model.json`` beside ``path`` that records this very file (name, size and
    sha256 equal), else ``(None, "")``.
    """
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(SETTINGS_KEY), Mapping):
        return dict(checkpoint[SETTINGS_KEY]), str(path)
    path = Path(path)
    record_path = path.with_name(RECORD_FILE)
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None, ""
    if not isinstance(record, dict) or not isinstance(record.get("network"), dict) or record.get("file", path.name) != path.name:
        return None, ""
    if "size_bytes" in record and record["size_bytes"] != path.stat().st_size:
        return None, ""
    if "sha256" in record and record["sha256"] != file_sha256(path):
        return None, ""
    return dict(record["network"]), str(record_path)


def _short(target) -> str:
    return str(target).rsplit(".", 1)[-1]


def _describe(settings: Mapping, keys) -> str:
    """``SwinUNETRAttSE feature_size 12, depths [1, 1, 1, 1]``: the class and the named settings."""
    parts = [f"{k} {settings[k]}" for k in keys if k != "_target_" and k in settings]
    return " ".join([_short(settings.get("_target_", "?")), ", ".join(parts)]).strip()


def _tensors(n: int) -> str:
    return f"{n} tensor" + ("" if n == 1 else "s")


def _examples(keys: list[str], describe=str) -> str:
    shown = ", ".join(describe(k) for k in keys[:_EXAMPLES])
    return shown + (f" and {len(keys) - _EXAMPLES} more" if len(keys) > _EXAMPLES else "")


def check_weights(
    path: str | os.PathLike,
    network: nn.Module,
    settings: Mapping[str, Any] | None = None,
    checkpoint=None,
    key: str = "model",
    strict: bool = True,
    strict_shape: bool = True,
    logger: logging.Logger | None = None,
) -> None:
    """Refuse weights at ``path`` that do not fit ``network``, naming the weights' and the network's settings.

    Args:
        path: the checkpoint file (named in messages).
        network: the configured network (``(Distributed)DataParallel`` is unwrapped).
        settings: the configured network settings (e.g. ``feature_size``, ``depths``); compared with those
            recorded with the weights (:func:`recorded_settings`) to name what differs.
        checkpoint: ``path`` already loaded (default: read here, memory-mapped).
        key: the weights' key in a checkpoint of several entries; a checkpoint without it is the state dict.
        strict, strict_shape: MONAI ``CheckpointLoader`` semantics: ``strict`` refuses missing and unexpected
            tensors, ``strict_shape`` refuses tensors of another shape (``strict_shape=False`` loads only the
            tensors that fit, so nothing is refused).
        logger: where settings that differ although the tensors fit (e.g. ``spacing``) are reported as a warning.

    Raises:
        WeightsMismatchError: the tensors do not fit under ``strict`` / ``strict_shape``.
    """
    logger = logger or logging.getLogger(__name__)
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    state = checkpoint[key] if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping) else checkpoint
    if not isinstance(state, Mapping):
        raise WeightsMismatchError(f"{path}: not a state dict (found {type(state).__name__}); expected the weights of {network_class(network)}")
    found = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}
    expected = {k: tuple(v.shape) for k, v in _unwrap(network).state_dict().items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and found[k] != expected[k]]
    fits = not ((strict_shape and reshaped) or (strict and strict_shape and (missing or unexpected)))

    configured = {"_target_": network_class(network), **_plain(dict(settings or {}))}
    recorded, source = recorded_settings(path, checkpoint)
    recorded = _plain(recorded) if recorded is not None else None
    differ = []
    if recorded is not None:
        differ = [k for k in configured if k in recorded and
                  (_short(recorded[k]) != _short(configured[k]) if k == "_target_" else recorded[k] != configured[k])]

    if fits:
        partial = bool(reshaped or missing or unexpected)
        if differ:
            logger.warning(f"{path}: weights of {_describe(recorded, differ)} (recorded in {source}) load into the configured network "
                           f"{_describe(configured, differ)}" + ("" if partial else ": the tensors fit, results may differ from the training's"))
        if partial:
            logger.warning(f"{path}: {'strict_shape' if not strict_shape else 'strict'} off: {len(expected) - len(missing) - len(reshaped)} "
                           f"of the network's {len(expected)} tensors loaded, {len(missing) + len(reshaped)} keep their initial values, "
                           f"{len(unexpected)} of the weights unused")
        return
    kinds = ((reshaped, "of another shape"), (missing if strict else [], "of the network missing from the weights"),
             (unexpected if strict else [], "in the weights that the network does not have"))
    if differ:
        hints = [f"configure network_def as {_short(recorded['_target_'])}"] if "_target_" in differ else []
        settings_differ = [k for k in differ if k != "_target_"]
        hints += [f"set {'/'.join(settings_differ)} to the weights' values"] if settings_differ else []
        counts = ", ".join(f"{_tensors(len(keys))} {what}" for keys, what in kinds if keys)
        raise WeightsMismatchError(f"{path}: weights of {_describe(recorded, differ)} do not fit the configured network "
                                   f"{_describe(configured, differ)} ({', '.join(hints)} or use other weights; {counts})")
    details = [f"{_tensors(len(keys))} {what} (" + _examples(keys, describe) + ")" for (keys, what), describe in
               zip(kinds, (lambda k: f"{k}: weights {list(found[k])}, network {list(expected[k])}", str, str)) if keys]
    weights = (f"weights of {_describe(recorded, recorded)} (recorded in {source})" if recorded is not None
               else "weights (no network settings recorded with them)")
    raise WeightsMismatchError(f"{path}: {weights} do not fit the configured network {_describe(configured, configured)}: "
                               + "; ".join(details))


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` that refuses weights that do not fit the network they load into.

    Before MONAI's loading, every ``torch.nn.Module`` of ``load_dict`` is checked with
    :func:`check_weights` against the checkpoint (its entry of the same key, or the whole checkpoint
    for a single-entry ``load_dict`` and a bare state dict): a mismatch raises
    :class:`WeightsMismatchError` naming the weights' recorded settings and ``network_settings``
    (the configured ones, e.g. ``{"feature_size": 12, "depths": [1, 1, 1, 1]}``), or the differing
    tensors when no settings are recorded. Other arguments as ``CheckpointLoader`` (``strict``,
    ``strict_shape``, ``map_location``...).
    """

    def __init__(self, load_path: str, load_dict: dict, network_settings: Mapping[str, Any] | None = None, **kwargs) -> None:
        super().__init__(load_path, load_dict, **kwargs)
        self.network_settings = network_settings

    def __call__(self, engine) -> None:
        if not os.path.isfile(self.load_path):
            raise FileNotFoundError(f"{os.path.abspath(self.load_path)}: no weights file there (bundle_root is resolved from the "
                                    "working directory: run from the repository root or the bundle folder, or pass "
                                    "--bundle_root or --ckpt_path)")
        checkpoint = read_checkpoint(self.load_path)
        for key, obj in self.load_dict.items():
            if isinstance(obj, nn.Module):
                in_checkpoint = isinstance(checkpoint, Mapping) and key in checkpoint
                if in_checkpoint or len(self.load_dict) == 1:  # else MONAI reports the missing entry itself
                    check_weights(self.load_path, obj, self.network_settings, checkpoint if in_checkpoint else {key: checkpoint},
                                  key=key, strict=self.strict, strict_shape=self.strict_shape, logger=self.logger)
        del checkpoint
        super().__call__(engine)
