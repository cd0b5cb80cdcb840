"""Does one client's long prompt stall the others? `/health` polled while `camelid serve` prepares a long request.

    .venv/bin/python benchmarks/serve_event_loop.py                         # this tree's server
    .venv/bin/python benchmarks/serve_event_loop.py --baseline /tmp/old/src # and a server run from another
                                                                            # source tree (e.g. `git archive` of
                                                                            # an older commit), rounds alternating

Each round sends one request with ~0.9 MB of text (a 3-message chat, or the same text as one completions
prompt), which the server renders and tokenizes and then refuses as longer than the context, while /health is
polled every 20 ms on another connection. Printed per server and route (medians over the rounds): the long
request's time, the /health answers that came back while it was in flight, and the longest /health wait.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from camelid.serve.launch import RunningServer, start_server

TEXT = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 5200  # ~290k characters
MESSAGES = [{"role": "user", "content": "1 " + TEXT}, {"role": "assistant", "content": "2 " + TEXT},
            {"role": "user", "content": "3 " + TEXT}]
BODIES = {"/v1/chat/completions": {"messages": MESSAGES, "max_tokens": 4},
          "/v1/completions": {"prompt": "\n".join(m["content"] for m in MESSAGES), "max_tokens": 4}}


def one_round(url: str, route: str) -> tuple[float, int, float]:
    """(long request seconds, /health answers while it ran, longest /health wait in seconds)."""
    waits, answered, done = [], [], {}

    def long_request() -> None:
        r = httpx.post(f"{url}{route}", json=BODIES[route], timeout=600)
        done["status"], done["at"] = r.status_code, time.perf_counter()

    with httpx.Client(base_url=url, timeout=600) as probe, concurrent.futures.ThreadPoolExecutor(1) as pool:
        probe.get("/health")
        start = time.perf_counter()
        job = pool.submit(long_request)
        while not job.done():
            asked = time.perf_counter()
            probe.get("/health").raise_for_status()
            waits.append(time.perf_counter() - asked)
            answered.append(time.perf_counter())
            time.sleep(0.02)
        job.result()
    if done["status"] != 400:
        raise SystemExit(f"{url}{route}: expected the long request to be refused (400), got {done['status']}")
    during = sum(a < done["at"] for a in answered)
    return done["at"] - start, during, max(waits)


def serve(src: Path | None, log: Path) -> RunningServer:
    """A server importing camelid from `src` (None: as this process does)."""
    old = os.environ.get("PYTHONPATH")
    if src is not None:
        os.environ["PYTHONPATH"] = str(src)
    try:
        return start_server(["--context", "512", "--max-batch", "2"], log, threads=2)
    finally:
        if src is not None:
            os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a source folder (holding camelid/) to compare with")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server and route (default: 3)")
    args = parser.parse_args()
    names = {"this tree": None} | ({f"baseline {args.baseline}": args.baseline} if args.baseline else {})
    results: dict[tuple[str, str], list[tuple[float, int, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {name: serve(src, Path(tmp) / f"server{i}.log") for i, (name, src) in enumerate(names.items())}
        try:
            for _ in range(args.rounds):
                for route in BODIES:
                    for name, server in servers.items():  # alternating: load drifts hit every server alike
                        results.setdefault((name, route), []).append(one_round(server.url, route))
        finally:
            for server in servers.values():
                server.stop()
    print(f"{'server':<40} {'route':<22} {'request s':>9} {'/health answers':>15} {'longest wait s':>14}")
    for (name, route), rows in results.items():
        took, during, wait = (statistics.median(col) for col in zip(*rows))
        print(f"{name:<40} {route:<22} {took:>9.2f} {during:>15.0f} {wait:>14.3f}")


if __name__ == "__main__":
    main()
