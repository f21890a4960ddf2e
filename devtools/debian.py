"""Install Debian packages on demand (system tools the tests and Makefile targets need: Orthanc,
Chromium) with ``apt-get install -y --no-install-recommends``.

Only as root on a Debian/Ubuntu system; anywhere else ``AptUnavailable`` says why and what to run.
``apt-get update`` runs only when the first install attempt fails (a clean machine without package
lists). dpkg's lock is waited for (``DPkg::Lock::Timeout``), so two installs can run side by side.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Callable, Sequence

LOCK_TIMEOUT = 600  # seconds to wait for another apt/dpkg to finish


class AptUnavailable(RuntimeError):
    """Packages are missing and cannot be installed here (no apt-get, not root, or apt failed)."""


def _apt(args: Sequence[str], log: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "-o", f"DPkg::Lock::Timeout={LOCK_TIMEOUT}", *args]
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.append(f"$ {' '.join(cmd)}\n{r.stdout[-3000:]}")
    return r


def apt_install(packages: Sequence[str], present: Callable[[], bool], what: str = "") -> float:
    """Install ``packages`` unless ``present()``; returns the seconds spent (0.0 when present).

    Raises ``AptUnavailable`` (with the command to run by hand) when they cannot be installed.
    """
    if present():
        return 0.0
    what = what or ", ".join(packages)
    hint = f"apt-get install -y --no-install-recommends {' '.join(packages)}"
    if shutil.which("apt-get") is None:
        raise AptUnavailable(f"{what} not installed and apt-get is not available (not a Debian/Ubuntu system); install {' '.join(packages)} by other means")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise AptUnavailable(f"{what} not installed and installing needs root: run `sudo {hint}`")
    start = time.monotonic()
    log: list[str] = []
    r = _apt(["install", "-y", "--no-install-recommends", *packages], log)
    if r.returncode != 0:  # e.g. no package lists yet on a fresh machine
        _apt(["update"], log)
        r = _apt(["install", "-y", "--no-install-recommends", *packages], log)
    if r.returncode != 0 or not present():
        raise AptUnavailable(f"`{hint}` failed (exit {r.returncode}):\n" + "\n".join(log)[-4000:])
    return time.monotonic() - start
