"""benchmarks/gpu_check.py, the prepared GPU check, runs end to end on the CPU at a tiny width."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_at_a_tiny_width(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    args = ["--small", "--device", "cpu", "--resolution", "32", "--cycles", "1", "--lora-rank", "4"]
    gpu_check.main([*args, "--work", str(tmp_path)])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 6  # header, 2 modes x (2 measured depths + the extrapolation)
    for row in table[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] in ("full", "lora") and float(cells[2]) > 0 and float(cells[4]) >= 0
    assert sum("extrapolated" in row for row in table) == 2
