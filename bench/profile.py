"""``python -m bench.profile``: where a worker's (and a submit's) time goes, sampled with py-spy.

For each scenario, a pinned solo worker drains N tasks while py-spy samples it in the steady part of the drain
(from 5 % to 90 % of the tasks); ``submit`` is sampled in this process. Shares of the samples are turned into
approximate µs per task with the wall time per task of the same window. Writes ``PROFILE.md`` to ``--out``.
py-spy needs ptrace rights (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.app import publisher
from bench.procs import Worker, pinned_self, set_affinity
from bench.scenarios import BY_NAME, Bench, Scenario, unavailable

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")
_SHORTEN = re.compile(r"^.*?(?:site-packages|dist-packages|lib/python3\.\d+)/|^.*?/(?=(idemtasks|bench|worker)/)")


#: The part of a stack that differs between scenarios: a task's execution (Celery's tracer: the library's wrapper
#: and the body) in the worker, one publish call in the publisher.
WORKER_ROOT = "build_tracer.<locals>.trace_task"
PUBLISH_ROOT = "publisher.<locals>.<lambda>"


@dataclass
class Profile:
    title: str
    root: str
    samples: int
    wall_us: float  # wall time per task (or per call) over the sampled window
    inclusive: Counter[str]  # frames at or under ``root``
    own: Counter[str]


def _frame(raw: str) -> str:
    m = _FRAME.match(raw.strip())
    if not m:
        return raw.strip()
    return f"{m['func']} ({_SHORTEN.sub('', m['file'])})"


def load(path: Path, title: str, wall_us: float, root: str) -> Profile:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [_frame(f) for f in stack.split(";")]
        total += int(n)
        at = next((i for i, f in enumerate(frames) if f.startswith(root + " ")), None)
        if at is not None:
            for f in set(frames[at:]):
                inclusive[f] += int(n)
        own[frames[-1]] += int(n)
    return Profile(title, root, total, wall_us, inclusive, own)


def _spy(pid: int, out: Path, rate: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spy = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output",
                            str(out), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    set_affinity(spy.pid, frozenset({0}))  # off the CPU of the process it samples
    return spy


def _stop(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    spy.wait(timeout=60)


def profile_worker(bench: Bench, s: Scenario, n: int, rate: int, scratch: Path) -> Profile:
    bench.reset_state()
    run_id = uuid.uuid4().hex[:8]
    queue, counter_key = f"bench.prof.{s.name}.{run_id}", f"runs:{run_id}"
    task, publish = bench.client(s), publisher(s.lib)
    counter = bench.counter()
    raw = scratch / f"worker-{s.name}.txt"
    with pinned_self(frozenset({1})):
        for i in range(n):
            publish(task, f"{run_id}-{i}", queue)
        spec = bench.spec(s, queue=queue, counter_key=counter_key)
        with Worker(spec, scratch / f"{s.name}.log", pool="solo", cpus=frozenset({1})).start() as worker:
            done = 0
            while done < n // 20:
                worker.check_alive()
                time.sleep(0.01)
                done = int(counter.get(counter_key) or 0)
            spy, t0 = _spy(worker.pid, raw, rate), time.perf_counter()
            time.sleep(1.0)  # py-spy attaches asynchronously: count from when it samples
            c0, t0 = int(counter.get(counter_key) or 0), time.perf_counter()
            while (done := int(counter.get(counter_key) or 0)) < n * 9 // 10:
                worker.check_alive()
                time.sleep(0.05)
            wall = (time.perf_counter() - t0) / (done - c0) * 1e6
            _stop(spy)
    return load(raw, f"worker, {s.name}", wall, WORKER_ROOT)


def profile_submit(bench: Bench, s: Scenario, n: int, rate: int, scratch: Path) -> Profile:
    bench.reset_state()
    queue = f"bench.prof.submit.{uuid.uuid4().hex[:8]}"
    task, publish = bench.client(s), publisher(s.lib)
    raw = scratch / f"submit-{s.name}.txt"
    with pinned_self(frozenset({1})):
        for i in range(20):
            publish(task, f"warm-{i}-{uuid.uuid4().hex}", queue)
        spy = _spy(os.getpid(), raw, rate)
        time.sleep(1.0)
        t0 = time.perf_counter()
        for i in range(n):
            publish(task, f"p-{i}-{uuid.uuid4().hex[:8]}", queue)
        wall = (time.perf_counter() - t0) / n * 1e6
        _stop(spy)
    bench.broker.client().delete(queue)
    return load(raw, f"publisher, {s.name} ({s.publishes_with})", wall, PUBLISH_ROOT)


def markdown(profiles: list[Profile], top: int) -> str:
    out = ["# Where the time goes (py-spy)", "",
           "Shares are of py-spy's samples of the process (waiting on a socket counts, idle waits do not); "
           "≈µs/call is that share times the wall time per task or call over the sampled window. Inclusive: "
           "the function and everything it calls, listed for the frames at or under the part that differs "
           f"between scenarios (`{WORKER_ROOT}` in a worker, one publish call in the publisher).", ""]
    for p in profiles:
        out += [f"## {p.title}: {p.wall_us:,.0f} µs wall per call, {p.samples:,} samples", "",
                f"Under `{p.root}`:", "", "| inclusive | ≈µs/call | function |", "|--:|--:|---|"]
        for f, c in p.inclusive.most_common(top):
            out.append(f"| {c / p.samples:.1%} | {c / p.samples * p.wall_us:,.0f} | `{f}` |")
        out += ["", "Own time, whole process (the frame at the top of the stack):", "", "| own | ≈µs/call | function |",
                "|--:|--:|---|"]
        for f, c in p.own.most_common(15):
            out.append(f"| {c / p.samples:.1%} | {c / p.samples * p.wall_us:,.0f} | `{f}` |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="bare,idemtasks-redis,idemtasks-postgres")
    p.add_argument("--submits", default="bare,idemtasks-redis,idemtasks-postgres")
    p.add_argument("--tasks", type=int, default=3000)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = p.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="idemtasks-profile-"))
    bench = Bench(scratch).start()
    profiles = []
    try:
        for name in filter(None, a.workers.split(",")):
            if not unavailable(BY_NAME[name]):
                profiles.append(profile_worker(bench, BY_NAME[name], a.tasks, a.rate, scratch))
        for name in filter(None, a.submits.split(",")):
            if not unavailable(BY_NAME[name]):
                profiles.append(profile_submit(bench, BY_NAME[name], min(a.tasks, 2000), a.rate, scratch))
    finally:
        bench.close()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "PROFILE.md").write_text(markdown(profiles, a.top))
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {a.out / 'PROFILE.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
