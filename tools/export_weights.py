"""Export a trained checkpoint as the bundle's shipped weights: fp16 state dict + a record.

    python -m tools.export_weights --checkpoint runs/pretrain/models/model.pt \
        --out bundle/models/model.pt --command "make pretrain"

Writes ``--out``: ``{"model": the network's state dict, floating-point tensors as float16,
"network": the network settings}``, and, beside it, ``model.json``: file name, size in bytes, sha256,
dtype, the command that made it, the same network settings and the git commit. The settings are those
recorded in the checkpoint by training (else ``network_settings`` of ``--config``); the weights must
fit the network of ``--config`` (``custom.handlers.checkpoints.check_weights``, strict).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from custom.atomic_files import atomic_path
from custom.handlers.checkpoints import SETTINGS_KEY, NetworkRecord, check_weights, file_sha256
from devtools import REPO


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="a state dict, or {'model': state dict, 'network': settings, ...}, saved by the bundle")
    p.add_argument("--out", type=Path, default=REPO / "bundle" / "models" / "model.pt")
    p.add_argument("--config", type=Path, default=REPO / "bundle" / "configs" / "inference.json")
    p.add_argument("--command", default="make pretrain", help="the command that trained the checkpoint (recorded)")
    p.add_argument("--note", default="", help="free text recorded with the weights (training data, budget)")
    args = p.parse_args(argv)
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    nested = isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
    state = checkpoint["model"] if nested else checkpoint
    parser = ConfigParser()
    parser.read_config(str(args.config))
    network = parser.get_parsed_content("network_def")
    configured = parser.get_parsed_content("network_settings")
    check_weights(args.checkpoint, network, configured, checkpoint)  # refuses weights of another architecture or width, naming both
    recorded = checkpoint.get(SETTINGS_KEY) if nested else None
    settings = recorded if isinstance(recorded, dict) else NetworkRecord(network, configured).state_dict()
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    network.load_state_dict(half, strict=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        torch.save({"model": half, SETTINGS_KEY: settings}, tmp)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    record = {
        "file": args.out.name,
        "size_bytes": args.out.stat().st_size,
        "sha256": file_sha256(args.out),
        "dtype": "float16",
        "parameters": int(sum(v.numel() for v in half.values() if v.is_floating_point())),
        "network": settings,
        "command": args.command,
        "note": args.note,
        "source_checkpoint": os.path.relpath(args.checkpoint, REPO),
        "git_commit": commit,
    }
    record_path = args.out.with_name("model.json")
    record_path.write_text(json.dumps(record, indent=4) + "\n")
    print(json.dumps(record, indent=4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
