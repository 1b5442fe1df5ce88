"""A tiny run of benchmarks/svd_speed.py, so the script keeps working as the library changes."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def svd_speed(monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("svd_speed")
    yield module
    sys.modules.pop("svd_speed", None)
    sys.modules.pop("_common", None)


def test_small_run_writes_every_method(svd_speed, tmp_path, capsys):
    out = tmp_path / "svd_speed.json"
    assert svd_speed.main(["--shapes", "120x80", "--ranks", "4,8", "--repeats", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| shape | spectrum | k | method |" in table
    data = json.loads(out.read_text())
    assert data["machine"]["torch_threads"] >= 1
    rows = data["rows"]
    for spectrum in ("decay", "gaussian"):
        for k in (4, 8):
            case = {r["method"]: r for r in rows if r["spectrum"] == spectrum and r["k"] == k}
            assert {"svdkit", "svdkit n_iter=2", "sklearn", "svd_lowrank", "exact", "floor (6 x %d)" % (k + 10)} <= set(case)
            auto = case["svdkit"]
            assert auto["passes"] % 2 == 0 and 4 <= auto["passes"] <= 14  # 2 (q + 1), 1 <= q <= 6
            assert "floor (%d x %d)" % (auto["passes"], k + 10) in case  # the floor of the call timed
            assert case["svdkit n_iter=2"]["passes"] == 6
            assert case["sklearn"]["passes"] == (16 if k < 8 else 10)  # scikit-learn's n_iter 7 if k < 0.1 * 80, else 4
    for row in rows:
        if "error_ratio" in row:
            assert row["error_ratio"] >= 1 - 1e-4  # nothing beats Eckart-Young
        if row["method"] == "exact":
            assert row["error_ratio"] == pytest.approx(1.0, abs=1e-4)
        if row["method"] == "svdkit" and row["spectrum"] == "decay":
            assert row["error_ratio"] <= 1.002
    assert any("error" in line and "optimal" in line for line in data["targets"])
    assert "| passes |" in table


def test_floor_follows_the_library_plan(svd_speed):
    import torch

    A = torch.zeros(50, 300)
    _, passes, width = svd_speed.floor_runner(A, 4)  # n_iter=2
    assert (passes, width) == (6, 14)
    _, passes, width = svd_speed.floor_runner(A, 4, 1)  # the steps an adaptive call made
    assert (passes, width) == (4, 14)
    _, passes, width = svd_speed.floor_runner(A, 10)  # l = 20: only two Krylov blocks fit in 50
    assert (passes, width) == (4, 20)


def test_quick_and_argument_parsing(svd_speed):
    args = svd_speed.parse_args(["--quick"])
    assert args.shapes == svd_speed.QUICK_SHAPES and args.repeats == 2
    args = svd_speed.parse_args([])
    assert args.shapes == "1024x1024,4096x4096,4096x11008" and args.ranks == "16,64,256"
