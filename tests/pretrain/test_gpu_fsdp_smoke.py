"""benchmarks/gpu_fsdp.py is run by hand on a GPU; its --smoke mode keeps it runnable here:
the full DINOv2 step of the tiny recipe, plain and FSDP2 over a one-rank gloo group."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_fsdp.py"


def test_gpu_fsdp_benchmark_smoke_runs_on_cpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    flops = float(re.search(r"model FLOPs per step and rank: ([\d,.]+) GFLOP", out)[1].replace(",", ""))
    assert flops > 1.0  # the tiny step is a few GFLOP: the counter saw the matmuls
    for variant in ("plain", "fsdp2"):
        row = re.search(rf"^{variant}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
        assert row is not None, out
        assert float(row[1]) > 0 and float(row[3]) > 0
    assert re.search(r"fsdp2 / plain: throughput [\d.]+x", out), out
