"""``python -m worker.serve``: the web process and a worker together, for trying the service on one machine.

Production runs them separately (see ``docker-compose.yml``): ``uvicorn worker.web:app`` and
``celery -A worker worker``.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="8000")
    parser.add_argument("--concurrency", default="2")
    opts = parser.parse_args()
    procs = [
        subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "worker", "-l", "info",
                          "-c", opts.concurrency]),
        subprocess.Popen([sys.executable, "-m", "uvicorn", "worker.web:app", "--host", opts.host,
                          "--port", opts.port]),
    ]
    print(f"reference service on http://{opts.host}:{opts.port} (Ctrl-C stops it)", flush=True)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    return max((p.returncode or 0) for p in procs)


if __name__ == "__main__":
    raise SystemExit(main())
