"""``python -m chaos``: the reference service under faults, and the proof that nothing was lost or done twice.

Runs the service on Redis (a server of its own, restarted during the run) and PostgreSQL (a database of its own,
whose connections are terminated during the run). While clients send every operation several times — some copies
concurrently, some long after it finished — it SIGKILLs pool children and whole workers (and starts them again),
restarts Redis, terminates PostgreSQL connections and publishes duplicate deliveries, some of them delayed. It then
prints, as a table, what was accepted, the faults injected, and the numbers that must be 0: operations lost, ledger
rows charged twice, succeeded operations without a ledger row, operations a fault made fail (every amount sent is
valid), results that changed after being returned once. It exits 1 if any of them is not 0. A worker that exits by
itself is started again, as a process supervisor would, and counted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from celery import Celery

from idemtasks.stores.redis import RedisStore

from .procs import Database, Redis, Service

FAULTS = ("kill_child", "kill_worker", "restart_redis", "terminate_pg", "duplicate_delivery")


class Run:
    def __init__(self, opts: argparse.Namespace, workdir: Path) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.redis = Redis(workdir)
        self.db = Database()
        self.workdir = workdir
        self.faults: Counter[str] = Counter()
        self.accepted: dict[str, str] = {}  # key -> operation id
        self.first_final: dict[str, Any] = {}  # operation id -> first final body a client saw
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.done = threading.Event()  # the drain is over: no more supervising

    # ----------------------------------------------------------------- clients

    def post(self, client: httpx.Client, i: int) -> dict[str, Any]:
        body = {"account": f"chaos-{i}", "amount": 1 + i % 997}
        for _ in range(600):  # clients retry 409, 503 and broken connections with the same key, as Stripe's do
            try:
                r = client.post("/payments", json=body, headers={"Idempotency-Key": f"op-{i}"})
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            if r.status_code in (409, 503) or r.status_code >= 500:
                time.sleep(0.2)
                continue
            assert r.status_code in (200, 202), r.text
            data: dict[str, Any] = r.json()
            with self.lock:
                known = self.accepted.setdefault(f"op-{i}", data["id"])
                assert known == data["id"], f"op-{i} answered with two operation ids"
                if data["status"] in ("succeeded", "failed"):
                    self.first_final.setdefault(data["id"], data)
            return data
        raise RuntimeError(f"op-{i} was never accepted")

    def client(self, ops: list[int]) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{self.service.port}", timeout=10) as client:
            for i in ops:
                for _ in range(1 + self.rng.randrange(3)):
                    self.post(client, i)

    def late_replays(self) -> None:
        """Copies sent long after the first finished: they must replay the same result."""
        with httpx.Client(base_url=f"http://127.0.0.1:{self.service.port}", timeout=10) as client:
            while not self.stop.wait(1.0):
                with self.lock:
                    done = list(self.first_final.values())
                for body in self.rng.sample(done, min(5, len(done))):
                    i = int(body["result"]["account"].split("-")[1]) if body["result"] else None
                    if i is not None:
                        self.post(client, i)

    # ----------------------------------------------------------------- faults

    def inject(self, kind: str) -> None:
        if kind == "kill_child":
            children = self.service.children()
            if children:
                os.kill(self.rng.choice(children), signal.SIGKILL)
        elif kind == "kill_worker":
            i = self.rng.randrange(len(self.service.workers))
            self.service.kill_worker(i)
            time.sleep(1.0)
            self.service.start_worker(i)
        elif kind == "restart_redis":
            self.redis.restart()
        elif kind == "terminate_pg":
            self.db.terminate_connections()
        elif kind == "duplicate_delivery":
            self.duplicate_deliveries()
        self.faults[kind] += 1

    def duplicate_deliveries(self) -> None:
        """Publish again, with the same task id, messages of operations that were already accepted."""
        with self.lock:
            ids = list(self.accepted.values())
        store = RedisStore(self.store_url)
        app = Celery("chaos-dup", broker=self.broker_url, set_as_current=False)
        try:
            for op_id in self.rng.sample(ids, min(10, len(ids))):
                op = store.get_by_id(op_id)
                if op is None or op.payload is None:
                    continue
                name, args, kwargs = json.loads(op.payload)
                # Half arrive at once, half delayed (as a visibility-timeout redelivery or an ETA copy would).
                countdown = self.rng.choice([0, 0, 1, 3])
                app.send_task(name, args, kwargs, task_id=op.id, countdown=countdown or None, headers={
                    "idemtasks": {"scope": op.scope, "key": op.key, "fp": op.fingerprint}})
        finally:
            store.close()

    def supervise(self) -> None:
        while not self.done.wait(0.5):
            self.service.supervise()

    def fault_loop(self) -> None:
        plan = [kind for kind in FAULTS for _ in range(self.opts.faults)]
        self.rng.shuffle(plan)
        for kind in plan:
            if self.stop.wait(self.opts.fault_every):
                return
            try:
                self.inject(kind)
            except Exception as exc:  # a fault that could not be injected is reported, not fatal
                print(f"chaos: {kind} failed: {exc}", file=sys.stderr)

    # ----------------------------------------------------------------- the run

    def run(self) -> int:
        self.redis.start()
        self.db.create()
        self.store_url = f"redis://127.0.0.1:{self.redis.port}/0"
        self.broker_url = f"redis://127.0.0.1:{self.redis.port}/1"
        env = {"IDEMTASKS_STORE_URL": self.store_url, "CELERY_BROKER_URL": self.broker_url,
               "DATABASE_URL": self.db.url, "IDEMTASKS_LEASE": "3", "IDEMTASKS_SWEEP_INTERVAL": "1",
               "IDEMTASKS_PENDING_AFTER": "5", "IDEMTASKS_DATA_DIR": str(self.workdir / "data")}
        self.service = Service(env, self.workdir, workers=2)
        started = time.monotonic()
        try:
            self.service.start()
            time.sleep(3.0)
            faults = threading.Thread(target=self.fault_loop, daemon=True)
            late = threading.Thread(target=self.late_replays, daemon=True)
            supervisor = threading.Thread(target=self.supervise, daemon=True)
            faults.start()
            late.start()
            supervisor.start()
            ops = list(range(self.opts.operations))
            self.rng.shuffle(ops)
            chunks = [ops[i::self.opts.clients] for i in range(self.opts.clients)]
            with ThreadPoolExecutor(self.opts.clients) as pool:
                list(pool.map(self.client, chunks))
            sent = time.monotonic()
            faults.join()
            self.stop.set()
            late.join()
            lost, changed = self.drain()
            self.done.set()
            drained = time.monotonic() - sent
            doubles, missing = self.ledger_check()
            # Every amount sent is valid: a failed operation can only be a fault stored as the payment's outcome.
            failed_ops = [body for body in self.final.values() if body["status"] == "failed"]
            failed = len(failed_ops)
            for body in failed_ops[:10]:
                print(f"chaos: {body['id']} failed: {body['error']}", file=sys.stderr)
        finally:
            self.stop.set()
            self.done.set()
            self.service.stop()
            self.redis.stop()
            self.db.drop()
        rows = [("operations accepted", len(self.accepted)), *[(f"faults: {k}", self.faults[k]) for k in FAULTS],
                ("operations lost (must be 0)", lost), ("ledger rows charged twice (must be 0)", doubles),
                ("succeeded without a ledger row (must be 0)", missing),
                ("failed because of a fault (must be 0)", failed),
                ("results changed after being returned (must be 0)", changed),
                ("workers that exited by themselves (started again)", self.service.exits),
                ("time to drain after the last request (s)", f"{drained:.1f}"),
                ("total run time (s)", f"{time.monotonic() - started:.1f}")]
        print("| measure | value |\n|---|---|")
        for name, value in rows:
            print(f"| {name} | {value} |")
        return 0 if lost == doubles == missing == changed == failed == 0 else 1

    def drain(self) -> tuple[int, int]:
        deadline = time.monotonic() + self.opts.drain_timeout
        pending = dict(self.accepted)
        final: dict[str, Any] = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{self.service.port}", timeout=10) as client:
            while pending and time.monotonic() < deadline:
                for key, op_id in list(pending.items()):
                    try:
                        body = client.get(f"/operations/{op_id}").json()
                    except (httpx.HTTPError, ValueError):
                        continue
                    if body.get("status") in ("succeeded", "failed"):
                        final[op_id] = body
                        del pending[key]
                time.sleep(0.5)
        changed = sum(1 for op_id, first in self.first_final.items()
                      if op_id in final and (final[op_id]["result"], final[op_id]["error"])
                      != (first["result"], first["error"]))
        self.final = final
        return len(pending), changed

    def ledger_check(self) -> tuple[int, int]:
        engine = sa.create_engine(self.db.url)
        try:
            with engine.connect() as conn:
                counts = dict(conn.execute(sa.text(
                    "SELECT operation_id, count(*) FROM ledger GROUP BY operation_id")).all())
        finally:
            engine.dispose()
        doubles = sum(1 for n in counts.values() if n > 1)
        missing = sum(1 for op_id, body in self.final.items() if body["status"] == "succeeded" and op_id not in counts)
        return doubles, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--operations", type=int, default=300)
    parser.add_argument("--faults", type=int, default=3, help="faults of each kind")
    parser.add_argument("--fault-every", type=float, default=1.5, help="seconds between faults")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=1)
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="idemtasks-chaos-") as tmp:
        return Run(opts, Path(tmp)).run()


if __name__ == "__main__":
    raise SystemExit(main())
