"""Start and stop a real `monailabel start_server` of monailabel_app/ on a free loopback port.

Shared by the app's test files and `benchmarks/load_test.py`: a copy of the bundle whose
models/model.pt is an untrained tiny network (quick.json + tiny overrides passed with --conf), so
inference and training are quick on a CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from devtools import REPO

APP = REPO / "monailabel_app"
VENV_BIN = Path(sys.executable).parent
CONFIGS = "inference.json,quick.json"
# Tiny and fast on 2 CPU cores; use_crf: the bundle default, explicit (the app runs inference.json's CRF).
# iterations_per_epoch None: one pass over the few training studies an epoch (quick.json's 32 would be 10 times longer).
OVERRIDES = {"use_crf": True, "spacing": [5.0, 5.0, 5.0], "roi_size": [64, 32, 32], "num_samples": 1, "warmup_epochs": 1,
             "iterations_per_epoch": None}
MODEL = "brats"
STARTUP_TIMEOUT = 180


class ServerError(RuntimeError):
    """The server exited or did not answer in time (the message ends with its log)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundle_copy(root: Path, with_weights: bool, overrides: dict | None = None) -> Path:
    """``root/configs`` (the repo's bundle configs) and ``root/models/model.pt`` (a seeded untrained network)."""
    import torch

    from monailabel_app.lib.bundle_config import load_bundle_config

    shutil.copytree(REPO / "bundle" / "configs", root / "configs")
    (root / "models").mkdir(parents=True)
    if with_weights:
        parser = load_bundle_config(str(root), CONFIGS.split(","), overrides or OVERRIDES)
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    return root


def launch(tmp: Path, studies: Path, bundle_root: Path, conf: dict | None = None, env: dict | None = None,
           port: int | None = None, log_name: str = "server.log", ready_headers: dict | None = None,
           overrides: dict | None = None) -> tuple[subprocess.Popen, dict]:
    """Start the server (its own process group) and wait until ``GET /info/`` answers 200."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {}))
    log_path = tmp / log_name
    options = {"models": MODEL, "bundle_root": str(bundle_root), "bundle_configs": CONFIGS, "mc_samples": "4",
               # no spaces: the launcher re-splits `$*`
               "bundle_overrides": json.dumps(overrides or OVERRIDES, separators=(",", ":")), **(conf or {})}
    cmd = [str(VENV_BIN / "monailabel"), "start_server", "--app", str(APP), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port)]
    for key, value in options.items():
        cmd += ["--conf", key, str(value)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise ServerError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            requests.get(f"{url}/info/", headers=ready_headers, timeout=10).raise_for_status()
            break
        except requests.RequestException:
            if time.monotonic() > deadline:
                stop(proc)
                raise ServerError(f"server not up after {STARTUP_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
    return proc, {"url": url, "port": port, "studies": studies, "tmp": tmp, "log": log_path, "bundle": bundle_root, "pid": proc.pid}


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the launcher starts python as a child), SIGKILL after 20 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        except ProcessLookupError:
            proc.wait()


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the server's process group: no shutdown handler runs."""
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()


def server_pids(proc: subprocess.Popen) -> list[int]:
    """Processes of the server's process group (launcher shell, uvicorn python, task subprocesses)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.info["pid"]) == proc.pid:
                out.append(p.info["pid"])
        except (ProcessLookupError, psutil.Error, OSError):
            pass
    return out
