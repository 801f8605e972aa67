"""User-space instructions per task, counted by valgrind's callgrind: a figure no other process can move.

Wall-clock and CPU-time figures swing with whatever else the machine runs (a shared VM's steal time moves them by
tens of percent between rounds); an instruction count is the same run after run. It covers the Python side only —
the kernel's work for a socket write and the servers' work are not counted — so it tells how much a library adds to
the interpreter's work per task, and whether a change to the hot path made it cheaper.

Each path runs in a child process under ``valgrind --tool=callgrind`` twice, once with 1 and once with N+1 measured
iterations after the same set-up; the difference over N is the cost of one iteration, start-up excluded. Both run
with the same fixed ``PYTHONHASHSEED``, so that their dictionaries are laid out alike.

* ``worker``: Celery's own tracer (what a worker process runs for each message) calling the task in process, for a
  message as ``submit`` sends it (idemtasks) or as ``apply_async`` sends it (the others, whose publish-time locks
  are taken in the set-up); the body is the usual Redis INCR.
* ``publish``: one ``submit`` (idemtasks) or ``apply_async`` (the others) to a queue that nothing consumes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.app import AppSpec, make_app, publisher
from bench.procs import ROOT
from bench.scenarios import Bench, Scenario

PATHS = ("worker", "publish")
_COLLECTED = re.compile(r"Collected : ([\d,]+)")


@dataclass
class Count:
    scenario: str
    path: str
    per_task: float  # instructions per iteration
    iterations: int


def available() -> str | None:
    """Why the section cannot run here, or ``None``."""
    return None if shutil.which("valgrind") else "valgrind is not on the PATH (apt-get install valgrind)"


def run(bench: Bench, scenarios: list[Scenario], iterations: int, paths: list[str] | None = None) -> list[Count]:
    unknown = set(paths or ()) - set(PATHS)
    if unknown:
        raise ValueError(f"unknown callgrind paths: {', '.join(sorted(unknown))} (known: {', '.join(PATHS)})")
    out = []
    for s in scenarios:
        for path in paths or PATHS:
            queue = f"bench.instructions.{uuid.uuid4().hex[:8]}"  # nothing consumes it; deleted below
            # A fixed hash seed: with a random one, each process lays its dicts out differently, and the probes of
            # string-keyed lookups alone moved a run's total by a million instructions.
            env = {**os.environ, **bench.spec(s, queue=queue).env(), "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}
            # The two counts of one path run side by side: 2 CPUs, and valgrind is single-threaded.
            with ThreadPoolExecutor(2) as pool:
                runs = [pool.submit(_count, path, n, env, iterations + 1) for n in (1, iterations + 1)]
                short, long = (r.result() for r in runs)
            out.append(Count(s.name, path, (long - short) / iterations, iterations))
            bench.broker.client().delete(queue)
    bench.reset_state()
    return out


def _count(path: str, n: int, env: dict[str, str], setup: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out", sys.executable, "-m",
             "bench.instructions", path, str(n), str(setup)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    found = _COLLECTED.search(proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run of the {path} path failed: {proc.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


# ----------------------------------------------------------------- the child, under valgrind

def _child(path: str, n: int, setup: int) -> None:
    spec = AppSpec.from_env()
    app, task = make_app(spec, main="bench-instructions")
    keys = [f"ins-{i}-{uuid.uuid4().hex}" for i in range(setup)]
    publish = publisher(spec.lib)
    if path == "publish":
        for key in keys[:n]:
            publish(task, key, spec.queue)
        return
    from celery.app.trace import build_tracer

    requests = [_request(task, spec, publish, key) for key in keys]  # the same set-up whatever n is
    tracer = build_tracer(task.name, task, app=app, eager=False)
    for req in requests[:n]:
        tracer(req["id"], req["args"], {}, req)


def _request(task: Any, spec: AppSpec, publish: Any, key: str) -> dict[str, Any]:
    req: dict[str, Any] = {"task": task.name, "args": (key,), "kwargs": {}, "hostname": "bench", "delivery_info": {},
                           "headers": {}}
    if spec.lib == "idemtasks":
        op = task.submit((key,), key=key, queue=spec.queue).operation
        header = {"scope": op.scope, "key": op.key, "fp": op.fingerprint}
        return {**req, "id": op.id, "headers": {"idemtasks": header}, "idemtasks": header}
    if spec.lib != "powertools":
        publish(task, key, spec.queue)  # the lock libraries take their lock here, as a real publish does
    return {**req, "id": uuid.uuid4().hex}


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
