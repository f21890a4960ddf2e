"""A throw-away Orthanc PACS (Debian's ``orthanc`` + ``orthanc-dicomweb``) with the project's config.

The config is ``monailabel_app/orthanc/orthanc.json`` (plain JSON): HTTP only (the DICOM port is
off), DICOMweb at ``/dicom-web/``, no authentication, ``RemoteAccessAllowed: false``. Orthanc 1.10
has no option to bind its HTTP server to one address: it listens on every interface, and
``RemoteAccessAllowed: false`` makes it refuse (HTTP 403) every client that is not on loopback.
``HttpPort`` and the storage folder are filled in per run (Orthanc reads only integers for ports,
no environment variables), and the rendered file is written next to the database::

    python -m devtools.orthanc [--port 8042] [--storage DIR]    # foreground, Ctrl-C stops it
    make orthanc [ORTHANC_PORT=8042]

    with Orthanc() as pacs:        # a free port and a temporary database, removed afterwards
        pacs.dicomweb_url          # http://127.0.0.1:PORT/dicom-web

The packages are installed when missing (``devtools.debian.apt_install``: root and apt-get needed).
On a machine with systemd, installing the package also starts Debian's own ``orthanc`` service
(port 8042, /etc/orthanc); this module's instances are independent of it (pick another port).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from devtools import REPO
from devtools.debian import AptUnavailable, apt_install

CONFIG = REPO / "monailabel_app" / "orthanc" / "orthanc.json"
PACKAGES = ("orthanc", "orthanc-dicomweb")
BINARY = "Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

__all__ = ["Orthanc", "AptUnavailable", "ensure_installed", "render_config", "free_port"]


def installed() -> bool:
    return shutil.which(BINARY) is not None and os.path.exists(DICOMWEB_PLUGIN)


def ensure_installed() -> float:
    """Install Orthanc and its DICOMweb plugin when missing; seconds spent (0.0 if present)."""
    return apt_install(PACKAGES, installed, "Orthanc (orthanc, orthanc-dicomweb)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(port: int, storage: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike = CONFIG) -> Path:
    """The project's config with ``HttpPort`` = ``port`` and the database in ``storage``."""
    conf = json.loads(Path(config).read_text())
    conf["HttpPort"] = int(port)
    conf["StorageDirectory"] = conf["IndexDirectory"] = str(Path(storage).resolve())
    out = Path(out)
    out.write_text(json.dumps(conf, indent=2) + "\n")
    return out


class Orthanc:
    """One Orthanc process on ``127.0.0.1:port`` with its database in ``workdir`` (a temporary folder,
    deleted on ``stop``, unless given)."""

    def __init__(self, port: int | None = None, workdir: str | os.PathLike | None = None, startup_timeout: float = 60.0):
        self.port = int(port) if port else free_port()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="orthanc-"))
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> "Orthanc":
        ensure_installed()
        with socket.socket() as s:  # Orthanc listens on every interface: the port must be free on all
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Orthanc: connections in TIME_WAIT do not count
            try:
                s.bind(("0.0.0.0", self.port))
            except OSError as e:
                raise RuntimeError(f"port {self.port} is in use ({e}); pick another (--port / ORTHANC_PORT)") from e
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = render_config(self.port, self.workdir / "db", self.workdir / "orthanc.json")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([shutil.which(BINARY), str(config)], cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                requests.get(f"{self.dicomweb_url}/studies", timeout=5).raise_for_status()
                return self
            except requests.RequestException:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc not answering on {self.url} after {self.startup_timeout:.0f} s:\n{self.log()[-3000:]}")
                time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # Orthanc shuts down cleanly on SIGTERM
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m devtools.orthanc``: run the project's Orthanc in the foreground (Ctrl-C stops it)."""
    parser = argparse.ArgumentParser(prog="python -m devtools.orthanc", description=main.__doc__)
    parser.add_argument("--port", type=int, default=8042)
    parser.add_argument("--storage", help="database folder, kept (default: a temporary folder, deleted on exit)")
    parser.add_argument("--install-only", action="store_true", help="install the Debian packages when missing, then exit")
    args = parser.parse_args(argv)
    try:
        seconds = ensure_installed()
    except AptUnavailable as e:
        parser.exit(2, f"error: {e}\n")
    if seconds:
        print(f"installed {' '.join(PACKAGES)} in {seconds:.1f} s", flush=True)
    if args.install_only:
        return 0
    pacs = Orthanc(args.port, args.storage)
    # stop Orthanc (and drop a temporary database) on SIGTERM, and on Ctrl-C even when started in the
    # background by a shell (which ignores SIGINT for background jobs)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        pacs.start()
        print(f"Orthanc {pacs.url} (DICOMweb {pacs.dicomweb_url}, database {pacs.workdir}); Ctrl-C stops it", flush=True)
        while pacs.proc.poll() is None:
            time.sleep(1)
        print(f"Orthanc exited with {pacs.proc.returncode}:\n{pacs.log()[-2000:]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        pacs.stop()


if __name__ == "__main__":
    sys.exit(main())
