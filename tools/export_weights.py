"""Export a trained checkpoint as the bundle's shipped weights: fp16 state dict + a record.

    python tools/export_weights.py --checkpoint runs/pretrain/models/model.pt \
        --out bundle/models/model.pt --command "make pretrain"

Writes ``--out`` (the network's state dict, floating-point tensors as float16) and, beside it,
``model.json``: file name, size in bytes, sha256, dtype, the command that made it, the network
settings of ``inference.json`` it loads into (checked here with ``strict=True``) and the git commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
from pathlib import Path

import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
NETWORK_KEYS = ("feature_size", "depths", "num_heads", "spatial_attention", "squeeze_excitation", "dropout_prob", "spacing", "roi_size")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="a state dict (or {'model': state dict}) saved by the bundle")
    p.add_argument("--out", type=Path, default=REPO / "bundle" / "models" / "model.pt")
    p.add_argument("--config", type=Path, default=REPO / "bundle" / "configs" / "inference.json")
    p.add_argument("--command", default="make pretrain", help="the command that trained the checkpoint (recorded)")
    p.add_argument("--note", default="", help="free text recorded with the weights (training data, budget)")
    args = p.parse_args(argv)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    parser = ConfigParser()
    parser.read_config(str(args.config))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(half, strict=True)  # refuses weights of another architecture or width
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    torch.save(half, tmp)
    os.replace(tmp, args.out)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    record = {
        "file": args.out.name,
        "size_bytes": args.out.stat().st_size,
        "sha256": sha256(args.out),
        "dtype": "float16",
        "parameters": int(sum(v.numel() for v in half.values() if v.is_floating_point())),
        "network": {"_target_": parser["network_def"]["_target_"], **{k: parser[k] for k in NETWORK_KEYS}},
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
