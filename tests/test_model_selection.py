"""The metric that picks the best checkpoint scores like the evaluation that reports it (BraTS rule:
both masks empty -> Dice 1, one empty -> 0), so "best model" and the reported figure agree on cases
without enhancing tumour."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from ignite.engine import Engine
from monai.bundle import ConfigParser

from custom.metrics import region_dice

CONFIGS = REPO / "bundle" / "configs"


def _cases():
    """Two cases as (pred, label) (3, 8, 8, 8) region masks: one with every region, one without ET
    where the prediction has no ET either (Dice 1 for ET) and one false-positive ET case (Dice 0)."""
    full = torch.zeros(3, 8, 8, 8)
    full[:, 2:6, 2:6, 2:6] = 1
    no_et = full.clone()
    no_et[2] = 0
    false_et = full.clone()
    return [(full, full), (no_et, no_et), (false_et, no_et)]


@pytest.mark.parametrize("configs, metric", [(["train.json"], "validate#key_metric#val_mean_dice"),
                                             (["train.json"], "validate#additional_metrics#val_dice_et"),
                                             (["train.json", "evaluate.json"], "validate#key_metric#val_mean_dice")])
def test_selection_metric_scores_empty_masks_like_the_evaluation(configs, metric):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    handler = parser.get_parsed_content(metric)
    pred_key, label_key = {"val_mean_dice": ("pred", "label"), "val_dice_et": ("pred_et", "label_et")}[metric.split("#")[-1]]
    if configs[-1] == "evaluate.json":
        label_key = "eval_label"
    batches = []
    for pred, label in _cases():
        item = {"pred": pred, "label": label, "eval_label": label, "pred_et": pred[2:3], "label_et": label[2:3]}
        batches.append([{pred_key: item[pred_key], label_key: item[label_key]}])
    engine = Engine(lambda e, batch: batch)
    handler.attach(engine, "score")
    engine.run(batches, max_epochs=1)
    if metric.endswith("val_dice_et"):
        expected = sum(region_dice(p, lab)["ET"] for p, lab in _cases()) / 3
    else:
        expected = sum(sum(region_dice(p, lab).values()) / 3 for p, lab in _cases()) / 3
    assert engine.state.metrics["score"] == pytest.approx(expected)
    assert expected == pytest.approx(2 / 3 if metric.endswith("val_dice_et") else 8 / 9)  # the no-ET case counts as 1 for ET
