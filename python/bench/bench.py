"""Benchmark of the Python client against the Rust ``test_server`` through zrpcd.

Scenarios (named as in ``zrpc-bench``):

* ``seq_small``: one blocking :class:`zrpc.client.Client`, one small call at a
  time (``test_server.func`` with ``{'haha': 'brt'}``); latency p50/p99.
* ``conc_small_64``: one :class:`zrpc.aio.Client`, 64 asyncio tasks calling in
  a loop; calls per second.

Usage: ``python bench/bench.py [--zrpcd PATH] [--calls N] [--seconds S]``.
zrpcd is ``--zrpcd``, else ``$ZRPCD``, else ``target/release/zrpcd`` (then
``target/debug/zrpcd``) of the repository; ``test_server`` is taken from the
same directory. Both run in a private socket directory and are killed by pid
at the end. The original Python zrpc's figures on the same 2-core machines:
p50 91 us sequential, 5.3k calls/s with 64 asyncio tasks.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))

from zrpc import aio  # noqa: E402
from zrpc.client import Client  # noqa: E402

PAYLOAD = {"haha": "brt"}


def find_zrpcd(explicit):
    """The zrpcd binary to use."""
    for p in (explicit, os.environ.get("ZRPCD"), os.path.join(REPO, "target", "release", "zrpcd"),
              os.path.join(REPO, "target", "debug", "zrpcd")):
        if p and os.path.exists(p):
            return p
    sys.exit("zrpcd not found: build it (cargo build --release -p zrpcd -p zrpc-examples) or pass --zrpcd")


def wait_for(cond, bound, what):
    """Polls ``cond`` until true, at most ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while not cond():
        if time.monotonic() > deadline:
            sys.exit("timed out waiting for %s" % what)
        time.sleep(0.01)


def accepts(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def seq_small(socket_dir, calls):
    """Latencies (seconds) of ``calls`` sequential calls."""
    c = Client(socket_dir)
    for _ in range(min(1000, calls)):
        c.call("test_server", "func", PAYLOAD)
    lat = []
    clock = time.perf_counter
    for _ in range(calls):
        t0 = clock()
        c.call("test_server", "func", PAYLOAD)
        lat.append(clock() - t0)
    c.close()
    lat.sort()
    return lat


async def conc_small(socket_dir, tasks, seconds):
    """Calls per second with ``tasks`` asyncio tasks on one client for ``seconds``."""
    c = await aio.Client.connect(socket_dir)
    done = 0
    stop = time.monotonic() + seconds

    async def worker():
        nonlocal done
        while time.monotonic() < stop:
            await c.call("test_server", "func", PAYLOAD)
            done += 1

    await asyncio.gather(*[worker() for _ in range(tasks)])  # warm-up round, same length
    done = 0
    t0 = time.monotonic()
    stop = t0 + seconds
    await asyncio.gather(*[worker() for _ in range(tasks)])
    rate = done / (time.monotonic() - t0)
    await c.close()
    return rate


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zrpcd")
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    zrpcd = find_zrpcd(args.zrpcd)
    server_bin = os.path.join(os.path.dirname(zrpcd), "test_server")
    if not os.path.exists(server_bin):
        sys.exit("%s not found (cargo build --release -p zrpc-examples)" % server_bin)
    d = tempfile.mkdtemp(prefix="zrpc-pybench-")
    env = dict(os.environ, ZRPC_SOCKET_DIR=d)
    procs = []
    try:
        procs.append(subprocess.Popen([zrpcd, "--socket-dir", d], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: accepts(os.path.join(d, "zrpcd.sock")), 10, "zrpcd")
        procs.append(subprocess.Popen([server_bin], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        probe = Client(d)
        wait_for(lambda: any(r["name"] == "test_server" for r in probe.call("zrpcd", "list")), 10,
                 "test_server")
        probe.close()
        lat = seq_small(d, args.calls)
        rate = asyncio.run(conc_small(d, args.tasks, args.seconds))
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
        shutil.rmtree(d, ignore_errors=True)
    res = {
        "zrpcd": zrpcd,
        "python": sys.version.split()[0],
        "seq_small_p50_us": round(lat[len(lat) // 2] * 1e6, 1),
        "seq_small_p99_us": round(lat[int(len(lat) * 0.99)] * 1e6, 1),
        "seq_small_calls_per_s": round(len(lat) / sum(lat)),
        "conc_small_%d_calls_per_s" % args.tasks: round(rate),
    }
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print("zrpcd: %s, Python %s" % (zrpcd, res["python"]))
    print("| scenario | zrpcd-client (Python) | original Python zrpc |")
    print("|---|---|---|")
    print("| seq_small p50 | %.1f us | 91 us |" % res["seq_small_p50_us"])
    print("| seq_small p99 | %.1f us | |" % res["seq_small_p99_us"])
    print("| conc_small_%d | %s calls/s | 5.3k calls/s |" % (args.tasks, format(round(rate), ",")))


if __name__ == "__main__":
    main()
