"""Deterministic case-level K-fold split and MONAI decathlon-format datalists.

``make_datalist(dir)`` returns ``{"training": [...], "testing": [...]}``: labelled cases go to
``training`` with a ``fold`` key (0..K-1), unlabelled ones to ``testing``. Entries hold
``case_id``, ``image`` (four per-modality paths in canonical order T1, T1ce, T2, FLAIR, or one 4D
path) and ``label``. Written as JSON, it reads with ``monai.data.load_decathlon_datalist``.

The split depends only on the case ids and the seed, not on listing order or on other files:
cases are ordered by ``sha256(f"{seed}:{case_id}")`` and dealt round-robin into K folds, so folds
differ in size by at most one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from custom.atomic_files import atomic_write
from custom.data.cases import list_cases
from custom.data.errors import BraTSDataError


def kfold_split(case_ids: list[str], n_folds: int = 5, seed: int = 0) -> dict[str, int]:
    """Map each case id to a fold in ``0..n_folds-1``, balanced and deterministic."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("case ids must be unique")
    order = sorted(case_ids, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    return {case_id: i % n_folds for i, case_id in enumerate(order)}


def make_datalist(dataset_dir: str | os.PathLike, n_folds: int = 5, seed: int = 0, check: str = "header") -> dict:
    """Decathlon-format datalist of ``dataset_dir`` (any layout ``custom.data`` detects)."""
    cases = list_cases(dataset_dir, check=check)
    labelled = [c for c in cases if c.label is not None]
    folds = kfold_split([c.case_id for c in labelled], n_folds, seed)
    return {
        "layout": cases[0].layout.name,
        "num_folds": n_folds,
        "training": [{**c.to_dict(), "fold": folds[c.case_id]} for c in labelled],
        "testing": [c.to_dict() for c in cases if c.label is None],
    }


def select_fold(datalist: dict, fold: int, validation: bool) -> list[dict]:
    """The validation cases of ``fold`` (``validation=True``) or the training cases of the others."""
    n = datalist.get("num_folds")
    if n is not None and not 0 <= fold < n:
        raise ValueError(f"fold must be in 0..{n - 1}, got {fold}")
    return [d for d in datalist["training"] if (d["fold"] == fold) == validation]


def main(argv: list[str] | None = None) -> int:
    """``python -m custom.data.datalist --dataset_dir DIR --out datalist.json [--folds 5 --seed 0]``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        datalist = make_datalist(args.dataset_dir, args.folds, args.seed)
    except (BraTSDataError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    out = Path(args.out)
    atomic_write(out, json.dumps(datalist, indent=2))
    print(f"{out}: {len(datalist['training'])} labelled cases in {args.folds} folds, {len(datalist['testing'])} unlabelled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
