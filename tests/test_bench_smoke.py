"""The benchmark still runs: a tiny ``python -m bench.run`` writes its table. Checks no timing (it is not a test of
speed, and the machine running it may be busy)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import services

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_bench_quick_run_writes_its_table(tmp_path: Path) -> None:
    # The bench starts private redis-servers; where Redis is expected (CI), the binary is too.
    services.require("redis")
    if shutil.which("redis-server") is None:
        services.missing("redis-server is not on the PATH")
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--tasks", "50", "--runs", "1", "--only",
           "bare,idemtasks-redis", "--sections", "throughput", "--configs", "pinned", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "RESULTS.md").read_text()
    # The pinned configuration only: it has all the machinery (its own redis-server, CPU pinning); the prefork one
    # differs by the worker's pool, and each configuration costs this suite a dozen seconds.
    assert "## Throughput — pinned" in table
    assert "| bare |" in table and "| idemtasks-redis |" in table
    assert (out / "throughput.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_instruction_counts_come_out_positive(tmp_path: Path) -> None:
    """The callgrind section measures something: a worker's run of one message costs instructions. (One path of
    the two: each takes two runs of Python under valgrind, the longest part of this suite; the publish path is the
    same machinery around a shorter loop.)"""
    services.require("redis")
    for tool in ("redis-server", "valgrind"):
        if shutil.which(tool) is None:
            services.missing(f"{tool} is not on the PATH")
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--only", "bare", "--sections", "instructions",
           "--instr-iterations", "3", "--instr-paths", "worker", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads((out / "results.json").read_text())["instructions"]
    assert {(c["scenario"], c["path"]) for c in counts} == {("bare", "worker")}
    assert all(c["per_task"] > 10_000 for c in counts)
    assert "## User-space instructions per task (callgrind)" in (out / "RESULTS.md").read_text()
