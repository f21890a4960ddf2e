"""Per-case BraTS region metrics (Dice, HD95 in mm) and the evaluation report writer.

Empty masks follow the BraTS challenge conventions: ground truth and prediction both empty give
Dice 1 and HD95 0; exactly one empty gives Dice 0 and HD95 373.13 mm (the diagonal of the
240x240x155 mm BraTS field of view). HD95 itself is MONAI's ``compute_hausdorff_distance``
(95th percentile, symmetric, in mm using the voxel spacing).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_hausdorff_distance

from custom.atomic_files import atomic_path, atomic_write
from custom.data import REGIONS

HD95_ONE_EMPTY_MM = 373.12866

def spacing_of(affine) -> tuple[float, ...]:
    """Voxel spacing in mm from a 4x4 voxel-to-world affine."""
    a = np.asarray(affine, dtype=float)
    return tuple(float(x) for x in np.linalg.norm(a[:3, :3], axis=0))


def _region_masks(pred, label) -> tuple[torch.Tensor, torch.Tensor]:
    pred_t, label_t = torch.as_tensor(pred) > 0.5, torch.as_tensor(label) > 0.5
    if pred_t.shape != label_t.shape or pred_t.shape[0] != len(REGIONS):
        raise ValueError(f"pred and label must both be (3, H, W, D) region masks, got {tuple(pred_t.shape)} and {tuple(label_t.shape)}")
    return pred_t, label_t


def region_dice(pred, label) -> dict[str, float]:
    """Dice per region (1 when both masks are empty). ``pred``, ``label``: ``(3, H, W, D)`` (TC, WT, ET)."""
    pred_t, label_t = _region_masks(pred, label)
    out = {}
    for i, region in enumerate(REGIONS):
        total = int(pred_t[i].sum()) + int(label_t[i].sum())
        out[region] = 1.0 if total == 0 else 2.0 * int((pred_t[i] & label_t[i]).sum()) / total
    return out


def region_metrics(pred, label, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, dict[str, float]]:
    """Dice and HD95 (mm) per region. ``pred``, ``label``: ``(3, H, W, D)`` masks (TC, WT, ET)."""
    pred_t, label_t = _region_masks(pred, label)
    dice = region_dice(pred_t, label_t)
    out = {}
    for i, region in enumerate(REGIONS):
        p, g = pred_t[i], label_t[i]
        if not p.any() and not g.any():
            hd95 = 0.0
        elif not p.any() or not g.any():
            hd95 = HD95_ONE_EMPTY_MM
        else:
            hd95 = float(compute_hausdorff_distance(p[None, None].float(), g[None, None].float(), include_background=True,
                                                    percentile=95, spacing=list(spacing))[0, 0])
        out[region] = {"dice": dice[region], "hd95": hd95}
    return out


def summarise(rows: list[dict]) -> dict:
    """Mean, median and std of every Dice/HD95 column over cases, per region and overall."""
    summary: dict = {"cases": len(rows)}
    for metric in ("dice", "hd95"):
        for region in (*REGIONS, "mean"):
            col = f"{metric}_{region}"
            vals = np.array([r[col] for r in rows], dtype=float)
            summary[col] = {
                "mean": float(vals.mean()) if len(vals) else math.nan,
                "median": float(np.median(vals)) if len(vals) else math.nan,
                "std": float(vals.std()) if len(vals) else math.nan,
            }
    return summary


def write_report(rows: list[dict], output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``metrics.csv`` (a row a case) and ``summary.json``, each atomically."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["case_id"] + [f"{m}_{r}" for m in ("dice", "hd95") for r in (*REGIONS, "mean")]
    csv_path, json_path = out / "metrics.csv", out / "summary.json"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in columns})
    atomic_write(json_path, json.dumps(summarise(rows), indent=2))
    return csv_path, json_path


def case_row(case_id: str, metrics: dict[str, dict[str, float]]) -> dict:
    row: dict = {"case_id": case_id}
    for m in ("dice", "hd95"):
        for r in REGIONS:
            row[f"{m}_{r}"] = metrics[r][m]
        row[f"{m}_mean"] = float(np.mean([metrics[r][m] for r in REGIONS]))
    return row


class BraTSMetricsWriter:
    """Evaluator handler: per-case region metrics, written as ``metrics.csv`` and ``summary.json``.

    Reads ``pred_key`` and ``label_key`` (``(3, H, W, D)`` region masks in the same grid, with an
    ``affine`` for the spacing) from the evaluator's output and ``case_id`` from its batch.
    """

    def __init__(self, output_dir: str | os.PathLike, pred_key: str = "pred", label_key: str = "label") -> None:
        self.output_dir = output_dir
        self.pred_key, self.label_key = pred_key, label_key
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def iteration_completed(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for out, batch in zip(outputs, batches):
            pred, label = out[self.pred_key], out[self.label_key]
            spacing = spacing_of(pred.affine) if hasattr(pred, "affine") else (1.0, 1.0, 1.0)
            case_id = batch.get("case_id") or f"case_{len(self.rows)}"
            self.rows.append(case_row(str(case_id), region_metrics(pred.cpu(), label.cpu(), spacing)))

    def epoch_completed(self, engine: Engine) -> None:
        csv_path, json_path = write_report(self.rows, self.output_dir)
        engine.logger.info(f"wrote {csv_path} and {json_path} ({len(self.rows)} cases)")


def region_volumes_ml(label, affine, convention) -> dict[str, float]:
    """Volumes of TC, WT and ET in mL of an integer label map ``(H, W, D)`` (or ``(1, H, W, D)``)
    in ``convention``'s values, with voxel size from the 4x4 ``affine`` (mm)."""
    lab = np.asarray(label.cpu() if isinstance(label, torch.Tensor) else label)
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0
    return {r: float(np.isin(lab, values).sum()) * voxel_ml for r, values in convention.region_labels.items()}
