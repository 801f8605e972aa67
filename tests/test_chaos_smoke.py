"""A small configuration of the chaos suite on every change: a few hundred operations, faults of each kind."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests import services
from tests.workers import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_nothing_lost_nothing_twice_under_faults() -> None:
    services.require("postgres")
    if shutil.which("redis-server") is None:
        services.missing("redis-server is not installed")
    # A fault every 0.8 s (1.5 s by default): the ten faults take 8 s of the run rather than 15.
    cmd = [sys.executable, "-m", "chaos", "--operations", "200", "--faults", "2", "--fault-every", "0.8"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=580)
    print(out.stdout, out.stderr[-3000:])
    rows = dict(line.strip("|").split("|")[:2] for line in out.stdout.splitlines() if line.startswith("| ")
                and "---" not in line and "measure" not in line)
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert rows["operations accepted"] == "200"
    for kind in ("kill_child", "kill_worker", "restart_redis", "terminate_pg", "duplicate_delivery"):
        assert rows[f"faults: {kind}"] == "2"
    for must_be_zero in ("operations lost (must be 0)", "ledger rows charged twice (must be 0)",
                         "succeeded without a ledger row (must be 0)", "failed because of a fault (must be 0)",
                         "results changed after being returned (must be 0)"):
        assert rows[must_be_zero] == "0"
