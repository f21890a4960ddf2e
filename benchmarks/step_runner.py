"""What the benchmark scripts share: every measured step runs in a fresh Python process.

A fresh process per step makes peak memory a per-step figure (``ru_maxrss`` of that process) and keeps
one step's caches, threads and allocator state out of the next one's timing. The driver calls
:func:`run_step`, which starts ``python -m benchmarks.<script> _worker <kind> <spec.json> <result.json>``; the
script's ``main`` hands such an argv to :func:`serve_step` with its table of workers
(``kind -> function(spec: dict) -> dict``). Each step's output is appended to a log file.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from devtools import REPO

CONFIGS = REPO / "bundle" / "configs"


def run_step(script: str | Path, kind: str, spec: dict, log: Path, threads: int | None = None) -> dict:
    """Run ``kind`` with ``spec`` in a fresh process of ``script``; its stdout/stderr go to ``log``.
    ``threads`` sets ``OMP_NUM_THREADS``. Returns the worker's result plus ``process_wall_s``;
    raises ``RuntimeError`` with the log's last lines if the step fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    result_path = spec_path + ".out"
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", f"benchmarks.{Path(script).stem}", "_worker", kind, spec_path, result_path]
    t0 = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n# spec: {json.dumps(spec)}\n")
        out.flush()
        rc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    os.unlink(spec_path)
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{kind} step failed (exit {rc}) after {wall:.0f} s; last lines of {log}:\n{tail}")
    result = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    result["process_wall_s"] = wall
    return result


def serve_step(argv: list[str], workers: dict[str, Callable[[dict], dict]]) -> bool:
    """In the step's process: if ``argv`` is ``_worker <kind> <spec> <result>``, run that worker, write its
    result and return True; otherwise return False (the driver's own command line)."""
    if not argv or argv[0] != "_worker":
        return False
    kind, spec_path, result_path = argv[1:4]
    result = workers[kind](json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result))
    return True


def run_training_timed(wf, trainer) -> tuple[float, list[float]]:
    """``wf.run()`` then ``wf.finalize()`` of a train workflow; returns (wall seconds of the run, seconds
    of every ``trainer`` iteration, ITERATION_STARTED -> ITERATION_COMPLETED)."""
    from ignite.engine import Events

    times: list[float] = []
    start: dict = {}
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: start.__setitem__("t", time.perf_counter()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: times.append(time.perf_counter() - start["t"]))
    t0 = time.perf_counter()
    wf.run()
    wall = time.perf_counter() - t0
    wf.finalize()
    return wall, times


def peak_memory() -> dict:
    """Peak resident memory of this process (GB) and, on CUDA, the peak allocated device memory (GB)."""
    import torch

    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if torch.cuda.is_available():
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def load_average() -> str:
    """The machine's 1/5/15-minute load averages, e.g. ``0.52/0.31/0.20`` (timings mean little when high)."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def emit_tables(text: str, out: Path | None, record: dict | None = None) -> None:
    """Print the markdown ``text`` and, with ``out``, write it there too (and ``record`` as JSON beside it, ``.json``)."""
    print("\n" + text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        if record is not None:
            out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"# tables written to {out}")


def variants_from(parser, given: list[list[str]] | None, default: str = "bundle") -> dict[str, list[str]]:
    """``--variant NAME [KEY=VALUE ...]`` (argparse ``append``, ``nargs="+"``) as {name: overrides}; none given: ``default``
    with no overrides. A value that is not KEY=VALUE is a usage error."""
    variants = {v[0]: v[1:] for v in given or [[default]]}
    for name, overrides in variants.items():
        if any("=" not in o for o in overrides):
            parser.error(f"--variant {name}: overrides are KEY=VALUE, got {overrides}")
    return variants
