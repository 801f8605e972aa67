"""Render the results (``results.json``) as ``RESULTS.md`` and ``throughput.png``.

``python -m bench.report [DIR]`` renders again from a saved ``results.json`` without re-running anything.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from bench.measure import fmt

#: The project's targets, checked here for the reader; the benchmark itself asserts nothing.
FLAT_GROWTH = 1.25  # "flat": claim + completion at 1,000,000 stored within 25 % of the cost at 10,000


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "--:" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return [*out, ""]


def _find(items: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((i for i in items if all(i.get(k) == v for k, v in match.items())), None)


def targets(res: dict[str, Any]) -> list[list[str]]:
    thr, rows = res.get("throughput", []), []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**not met**")

    def num(x: Any) -> float:
        return math.nan if x is None else float(x)

    pinned = _find(thr, config="pinned", scenario="idemtasks-redis") or {}
    prefork = _find(thr, config="prefork", scenario="idemtasks-redis") or {}
    pg = _find(thr, config="pinned", scenario="idemtasks-postgres") or {}
    r, w = num(pinned.get("ratio")), num(pinned.get("added_wall_us"))
    rows.append(["Redis store, pinned: ≥ 0.90x bare and ≤ +130 µs wall/task",
                 f"{fmt(r, 2)}x, {fmt(w, 0, signed=True)} µs",
                 verdict(None if math.isnan(r) else r >= 0.90 and w <= 130)])
    r, c = num(prefork.get("ratio")), num(prefork.get("added_cpu_us"))
    rows.append(["Redis store, prefork: ≥ 0.95x bare and ≤ +100 µs CPU/task",
                 f"{fmt(r, 2)}x, {fmt(c, 0, signed=True)} µs",
                 verdict(None if math.isnan(r) else r >= 0.95 and c <= 100)])
    lat = res.get("submit_latency", [])
    bare, redis_ = _find(lat, scenario="bare"), _find(lat, scenario="idemtasks-redis")
    if bare and redis_:
        d = redis_["p50_us"] - bare["p50_us"]
        rows.append(["submit ≤ +150 µs over apply_async (p50)", f"{fmt(d, 0, signed=True)} µs", verdict(d <= 150)])
    dups = [d for d in res.get("duplicates", []) if d["scenario"].startswith("idemtasks")]
    if dups:
        counts = ", ".join(f"{d['scenario'].removeprefix('idemtasks-')}/{d['order']} {d['executions']}" for d in dups)
        rows.append(["exactly 500 executions in every duplicate order", counts,
                     verdict(all(d["executions"] == d["keys"] for d in dups))])
    r = num(pg.get("ratio"))
    rows.append(["PostgreSQL store, pinned: ≥ 0.80x bare", f"{fmt(r, 2)}x",
                 verdict(None if math.isnan(r) else r >= 0.80)])
    growth = res.get("growth", [])
    for store in dict.fromkeys(g["store"] for g in growth):
        pts = sorted((g for g in growth if g["store"] == store), key=lambda g: g["stored"])
        if len(pts) >= 2:
            k = pts[-1]["claim_finish_p50_us"] / pts[0]["claim_finish_p50_us"]
            rows.append([f"flat growth, {store} ({pts[0]['stored']:,} → {pts[-1]['stored']:,} stored; "
                         f"within {FLAT_GROWTH:.2f}x)", f"{k:.2f}x ({fmt(pts[0]['claim_finish_p50_us'])} → "
                         f"{fmt(pts[-1]['claim_finish_p50_us'])} µs)", verdict(k <= FLAT_GROWTH)])
    mem = _find(res.get("footprint", []), store="redis")
    if mem:
        rows.append(["≤ 400 B of Redis memory per operation beyond its result",
                     f"{fmt(mem['beyond_result'])} B ({fmt(mem['bytes_per_op'])} B with a {mem['result_bytes']} B "
                     "result)", verdict(mem["beyond_result"] <= 400)])
    return rows


def spread(res: dict[str, Any]) -> list[str]:
    """How far the same scenario moved between rounds: the machine's noise, against which to read every ratio."""
    out = []
    for t in (t for t in res.get("throughput", []) if t["scenario"] == "bare" and len(t["rates"]) > 1):
        lo, hi = min(t["rates"]), max(t["rates"])
        out.append(f"Noise, {t['config']}: bare Celery drained {fmt(lo)} to {fmt(hi)} tasks/s across its "
                   f"{len(t['rates'])} rounds ({hi / lo:.2f}x); a ratio is the median of per-round pairs, which "
                   "cancels slow spells only when both runs of a pair share them.")
    return out


def markdown(res: dict[str, Any]) -> str:
    meta = res["meta"]
    out = ["# idemtasks benchmark results", "",
           f"Command: `{meta['command']}`  ", f"Revision: {meta.get('revision', 'not recorded')}  ",
           f"Date: {meta['date']}; total run time {meta['elapsed_min']:.1f} min  ",
           f"Machine: {meta['machine']}  ", f"Versions: {meta['versions']}", ""]
    out += [f"Workload: {meta['workload']}", ""]
    out += [f"* {n}" for n in meta.get("notes", [])]
    out += [f"* {n}" for n in spread(res)] + [""]
    if res.get("throughput"):
        out += ["## Targets", ""]
        out += _table(["target", "measured", "verdict"], targets(res))
    rts = {r["scenario"]: r for r in res.get("roundtrips", [])}
    for config in dict.fromkeys(t["config"] for t in res.get("throughput", [])):
        out += [f"## Throughput — {config}", "", meta["configs"].get(config, ""), ""]
        rows = []
        for t in (t for t in res["throughput"] if t["config"] == config):
            rt = rts.get(t["scenario"])
            trips = "n/a" if rt is None else f"{rt['publish']:.2f} + {rt['worker']:.2f}"
            rows.append([t["scenario"], fmt(t["rate"]), f"{t['ratio']:.3f}", fmt(t["added_wall_us"], signed=True),
                         fmt(t["added_cpu_us"], signed=True), fmt(t["cpu_us"]), fmt(t["server_cpu_us"]), trips,
                         fmt(t["store_commands"], 1), str(t["runs"])])
        out += _table(["scenario", "tasks/s", "x bare", "+µs wall/task", "+µs worker CPU/task", "worker CPU µs/task",
                       "redis CPU µs/task", "store round trips/task (publish + worker)",
                       "state-server commands/task in worker (incl. inside Lua)", "runs"], rows)
    if res.get("roundtrips"):
        out += ["## Store round trips per task", ""]
        out += _table(["scenario", "publish", "worker", "commands inside Lua (worker)", "method", "breakdown"],
                      [[r["scenario"], f"{r['publish']:.2f}", f"{r['worker']:.2f}", f"{r['inside_scripts']:.2f}",
                        r["method"], r["detail"]] for r in res["roundtrips"]])
    if res.get("duplicates"):
        orders = list(dict.fromkeys(d["order"] for d in res["duplicates"]))
        out += ["## Duplicate workload: body executions (ideal: one per key)", "",
                f"{res['duplicates'][0]['publishes']:,} publishes over {res['duplicates'][0]['keys']:,} keys, "
                "prefork worker (concurrency 2). Cells: executions (messages that reached the broker).", ""]
        out += [f"* **{o}**: {meta['orders'].get(o, '')}" for o in orders] + [""]
        rows = []
        for name in dict.fromkeys(d["scenario"] for d in res["duplicates"]):
            cells = []
            for o in orders:
                d = _find(res["duplicates"], scenario=name, order=o)
                cells.append("n/a" if d is None else f"{d['executions']:,} ({d['messages']:,})")
            rows.append([name, *cells])
        out += _table(["scenario", *orders], rows)
    if res.get("submit_latency"):
        bare = _find(res["submit_latency"], scenario="bare")
        out += ["## Publish latency (client side)", ""]
        out += _table(["scenario", "call", "p50 µs", "p99 µs", "mean µs", "+p50 vs bare apply_async", "samples"],
                      [[r["scenario"], r["what"], fmt(r["p50_us"]), fmt(r["p99_us"]), fmt(r["mean_us"]),
                        fmt(r["p50_us"] - bare["p50_us"], signed=True) if bare else "n/a", str(r["samples"])]
                       for r in res["submit_latency"]])
    if res.get("replay_latency"):
        out += ["## Replay latency (a duplicate of a finished operation)", ""]
        out += _table(["scenario", "path", "p50 µs", "p99 µs", "mean µs", "samples"],
                      [[r["scenario"], r["what"], fmt(r["p50_us"]), fmt(r["p99_us"]), fmt(r["mean_us"]),
                        str(r["samples"])] for r in res["replay_latency"]])
    if res.get("instructions"):
        out += ["## User-space instructions per task (callgrind)", "",
                "Counted by valgrind, so other processes cannot move them: the Python side only (no kernel work, no "
                "server work). **worker**: Celery's tracer running one message in process; **publish**: one `submit` "
                "(idemtasks) or `apply_async` (the others). See `bench/instructions.py`.", ""]
        counts = res["instructions"]
        rows = []
        for name in dict.fromkeys(c["scenario"] for c in counts):
            cells = []
            for path in ("worker", "publish"):
                c, base = _find(counts, scenario=name, path=path), _find(counts, scenario="bare", path=path)
                cells += ["n/a", "n/a"] if c is None else [
                    fmt(c["per_task"] / 1000, 0), fmt((c["per_task"] - base["per_task"]) / 1000, 0, signed=True)
                    if base else "n/a"]
            rows.append([name, *cells])
        out += _table(["scenario", "worker k instr./task", "+ vs bare", "publish k instr./call", "+ vs bare"], rows)
    if res.get("http"):
        out += ["## HTTP `POST /payments` through the reference service", "", meta.get("http", ""), ""]
        out += _table(["phase", "requests", "client threads", "p50 ms", "p99 ms", "requests/s", "statuses"],
                      [[h["phase"], str(h["requests"]), str(h["threads"]), fmt(h["p50_ms"], 1), fmt(h["p99_ms"], 1),
                        fmt(h["per_second"]), json.dumps(h["statuses"])] for h in res["http"]])
    if res.get("growth"):
        out += ["## Growth: one operation's cost as the store fills", "",
                "Per operation, in-process through the store API (no Celery): create (submit) then claim + finish "
                "(the worker's two calls).", ""]
        out += _table(["store", "already stored", "create p50 µs", "claim+finish p50 µs", "claim+finish mean µs",
                       "claim+finish p99 µs", "samples", "fill s"],
                      [[g["store"], f"{g['stored']:,}", fmt(g["create_p50_us"]), fmt(g["claim_finish_p50_us"]),
                        fmt(g["claim_finish_mean_us"]), fmt(g["claim_finish_p99_us"]), str(g["samples"]),
                        fmt(g["fill_seconds"], 1)] for g in res["growth"]])
    if res.get("footprint"):
        out += ["## Memory per stored operation", ""]
        out += _table(["store", "bytes/operation", "result bytes", "beyond the result", "method", "detail"],
                      [[f["store"], fmt(f["bytes_per_op"]), str(f["result_bytes"]), fmt(f["beyond_result"]),
                        f["method"], f["detail"]] for f in res["footprint"]])
    if res.get("skipped"):
        out += ["## Not run", ""] + [f"* {k}: {v}" for k, v in res["skipped"].items()] + [""]
    return "\n".join(out)


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = res.get("throughput", [])
    configs = list(dict.fromkeys(t["config"] for t in thr))
    if not configs:
        return
    fig, axes = plt.subplots(1, len(configs), figsize=(6.5 * len(configs), 0.55 * 8 + 1.6), squeeze=False)
    for ax, config in zip(axes[0], configs, strict=True):
        rows = [t for t in thr if t["config"] == config][::-1]
        names = [t["scenario"] for t in rows]
        rates = [t["rate"] for t in rows]
        colors = ["#888888" if n == "bare" else "#1f77b4" if n.startswith("idemtasks") else "#ff7f0e" for n in names]
        ax.barh(names, rates, color=colors)
        for y, t in enumerate(rows):
            ax.scatter(t["rates"], [y] * len(t["rates"]), color="black", s=8, zorder=3)
            # Right of the fastest run, so that the dots never cover the label.
            ax.text(max(t["rates"] + [t["rate"]]) * 1.01, y, f" {t['ratio']:.2f}x", va="center", fontsize=9)
        ax.set_title(f"{config}: {res['meta']['configs'].get(config, '')}", fontsize=9)
        ax.set_xlabel("tasks/s (bar: median; dots: each run; label: x bare Celery)")
        ax.set_xlim(0, max(max(t["rates"] + [t["rate"]]) for t in rows) * 1.22)
        ax.grid(axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="#888888", label="bare Celery"), Patch(color="#1f77b4", label="idemtasks"),
                        Patch(color="#ff7f0e", label="other libraries")], loc="lower center", ncol=3, fontsize=9)
    fig.suptitle(f"Drain throughput, {res['meta']['tasks']:,} trivial tasks (one Redis INCR each)", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / "RESULTS.md").write_text(markdown(res))
    chart(res, out / "throughput.png")


if __name__ == "__main__":
    where = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    write(json.loads((where / "results.json").read_text()), where)
