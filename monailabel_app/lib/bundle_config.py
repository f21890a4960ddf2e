"""Parse the bundle's config files for the app's tasks (one parser per task)."""

from __future__ import annotations

import os
from typing import Sequence

from monai.bundle import ConfigParser

# Default when the app does not pass the studies' layout: a study is one 4D MSD-style NIfTI.
DEFAULT_OVERRIDES = {"layout": "$brats.LAYOUTS['msd']"}


def load_bundle_config(bundle_root: str, configs: Sequence[str], overrides: dict | None = None) -> ConfigParser:
    """``<bundle_root>/configs/<configs...>`` merged in order (later top-level ids win), then
    ``bundle_root`` and ``DEFAULT_OVERRIDES`` + ``overrides``; FileNotFoundError names missing files."""
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
