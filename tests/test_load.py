"""benchmarks/load_test.py at a small size: its own server on loopback, 16 clients sending inference
requests and label saves while a training job runs, then 16 warm-up and 60 measured requests;
every request answered, none failed, server memory flat over one of the two halves of the measured
requests at least (a leak grows both; a one-off allocation, e.g. the model reloaded after training,
one), training finished and inference unharmed by it."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, run_env

from benchmarks.load_test import growth_per_request


def test_load_script_small_run(tmp_path):
    out = tmp_path / "load.json"
    cmd = [sys.executable, "-m", "benchmarks.load_test", "--start-server", "--workdir", str(tmp_path / "work"),
           "--cases", "3", "--requests", "60", "--warmup", "16", "--concurrency", "16", "--label-fraction", "0.9", "--train",
           "--max-growth-mb-per-request", "1.0", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    print(proc.stdout, proc.stderr[-3000:])
    assert out.is_file(), proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["answered"] == report["requests"] == 60
    assert report["failures"] == report["all_failures"] == 0, report["failure_samples"]
    assert report["all_answered"] == report["all_requests"] >= 60 + 16 + 16
    assert report["by_kind"]["infer"]["requests"] > 0 and report["by_kind"]["label"]["requests"] > 0
    assert report["rss_growth_mib_per_request"] <= 1.0, report  # no per-request leak
    assert 0 < report["rss_peak_mib"] < 4096
    training = report["training"]
    assert training["post_status"] == 200 and training["final_status"] == "DONE", training
    assert training["infer_while_training"] > 0 and training["infer_failed_while_training"] == 0, training
    assert proc.returncode == 0 and "PASSED" in proc.stdout
    for line in ("requests", "failures", "p50", "p95", "peak"):
        assert line in proc.stdout


def test_a_leak_grows_both_halves_and_a_one_off_allocation_one():
    assert growth_per_request([1000.0, 1210.0, 1420.0], (30, 30)) == 7.0  # an inference result left behind a request
    assert growth_per_request([1234.0, 1234.0, 1274.0], (30, 30)) == 0.0  # 40 MiB once, in the second half (seen in a run)
    assert growth_per_request([1000.0, 1040.0, 1040.0], (30, 30)) == 0.0  # the same in the first half
