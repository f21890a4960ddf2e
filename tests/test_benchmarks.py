"""The benchmark scripts run end to end at a tiny size and print their tables.

No timing is asserted anywhere: the benchmarks' numbers depend on the machine and its load.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from custom.synthetic import write_dataset
from devtools import REPO


def run_script(script: str, *args, timeout: int = 900) -> str:
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{Path(script).stem}", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc.stdout


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "brats2021"
    write_dataset(root, 5, seed=0, layout="brats2021", size="small")
    return root


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and line.strip("|").split("|")[0].strip().startswith(first_cell)]


def test_compare_models_trains_and_scores_every_requested_variant(small_dataset, tmp_path):
    out = tmp_path / "compare.md"
    # one variant keeps this a test of the script (the U-Net trains in tests/test_bundle.py); the table is the benchmark's.
    # --no_timing skips its two timed inference runs (about 28 s of the test); inference speed has its own benchmark, smoke-tested below
    stdout = run_script("compare_models.py", "--variants", "both", "--epochs", "1", "--dataset_dir", small_dataset, "--no_timing",
                        "--override", "iterations_per_epoch=null", "--work_dir", tmp_path / "work", "--out", out)  # one pass
    text = out.read_text()
    assert text in stdout and "validation fold 0" in text  # no held-out folder: says the figures share the selection set
    for label in ("Swin-UNETR + attention + SE",):
        rows = table_rows(text, label)
        assert [r[1] for r in rows[:2]] == ["no", "yes"], text  # without and with the CRF
        for r in rows[:2]:
            dice = [float(c.split("±")[0]) for c in r[2:6]]
            assert all(0.0 <= d <= 1.0 for d in dice), r
            assert int(r[7].replace(",", "")) > 0 and float(r[8]) > 0 and r[9] == "-", r  # params, s/it, no s/case (not timed)
    assert (tmp_path / "work" / "both" / "models" / "model.pt").is_file()


def test_training_throughput_smoke(small_dataset, tmp_path):
    out = tmp_path / "tt.md"
    run_script("training_throughput.py", "--smoke", "--dataset_dir", small_dataset, "--work_dir", tmp_path / "work", "--out", out)
    text = out.read_text()
    for label in ("MONAI SwinUNETR (stock)", "no-op network"):
        (row,) = [r for r in table_rows(text, label) if r[1] == "1"]
        assert float(row[3]) > 0 and 0 <= float(row[7].rstrip(" %")) <= 100, row  # samples/s, loader share


def test_inference_speed_smoke(tmp_path):
    out = tmp_path / "speed.md"
    run_script("inference_speed.py", "--smoke", "--case_dir", tmp_path / "case", "--work_dir", tmp_path / "work", "--out", out)
    text = out.read_text()
    (stock,) = table_rows(text, "MONAI SwinUNETR, stock pipeline")
    (ours,) = table_rows(text, "ours (inference.json as shipped), with CRF")
    assert stock[9] == "1.00", stock  # the reference of the ratios
    assert float(ours[3]) > 0 and float(ours[5]) > 0 and float(ours[9]) > 0, ours  # s/case, CRF s, ratio
    assert table_rows(text, "ours") and "max abs diff" in text  # the one-window table ran too
