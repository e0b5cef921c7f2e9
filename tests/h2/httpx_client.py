"""httpx over HTTP/2 (python-h2), for gracesrv's tests: the most used Python
client, which mishandles GOAWAY (python-h2 moves to CLOSED on the first one
and then rejects a PING and any response that follows it).

    httpx_client.py load URL [--tasks N] [--post]
        N tasks send requests one after another on one HTTP/2 connection
        (httpx's pool) until stdin closes; prints {"ok", "failed", "errors",
        "pids"}. "pids" counts the answers' bodies (the route answers
        "{pid}").

    httpx_client.py idle URL
        One request; then, for each line on stdin, one more request on the
        same client; prints one JSON line per request: {"status", "body",
        "error", "http_version"}.

    httpx_client.py busy URL SLOW_URL
        Starts a request to SLOW_URL and prints {"started": true}; at a line
        on stdin, sends one request to URL on the same client (the same
        HTTP/2 connection, busy with the slow one), and prints both answers
        as {"status", "body", "http_version", "same_connection"} lines, URL's
        first.
"""

import argparse
import asyncio
import json
import sys
import threading

import httpx


def client():
    return httpx.AsyncClient(http2=True, verify=False, timeout=30.0)


async def load(args):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def watch_stdin():
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    totals = {"ok": 0, "failed": 0, "errors": [], "pids": {}, "http2": 0}
    async with client() as c:

        async def task():
            while not stop.is_set():
                try:
                    if args.post:
                        r = await c.post(args.url, content=b"x" * 1000)
                    else:
                        r = await c.get(args.url)
                    if r.status_code != 200:
                        raise RuntimeError(f"status {r.status_code}")
                    totals["ok"] += 1
                    if r.http_version == "HTTP/2":
                        totals["http2"] += 1
                    pid = r.text.strip()
                    totals["pids"][pid] = totals["pids"].get(pid, 0) + 1
                except Exception as e:  # noqa: BLE001 - counted
                    totals["failed"] += 1
                    # Every kind of failure once (the stream IDs aside).
                    kind = f"{type(e).__name__}: {str(e).split(' last_stream_id')[0]}"
                    if kind not in totals["errors"]:
                        totals["errors"].append(kind)

        await asyncio.gather(*(task() for _ in range(args.tasks)))
    print(json.dumps(totals), flush=True)


async def idle(args):
    loop = asyncio.get_running_loop()
    async with client() as c:

        async def one():
            try:
                r = await c.get(args.url)
                out = {"status": r.status_code, "body": r.text, "error": None,
                       "http_version": r.http_version}
            except Exception as e:  # noqa: BLE001 - reported
                out = {"status": None, "body": None, "error": f"{type(e).__name__}: {e}",
                       "http_version": None}
            print(json.dumps(out), flush=True)

        await one()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            await one()


async def busy(args):
    loop = asyncio.get_running_loop()
    async with client() as c:
        slow = asyncio.create_task(c.get(args.slow_url))
        # Its headers are out once the connection is up and the task ran.
        await asyncio.sleep(0.5)
        print(json.dumps({"started": True}), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        r = await c.get(args.url)
        s = await slow
        same = r.extensions["network_stream"] is s.extensions["network_stream"]
        for x in (r, s):
            print(json.dumps({"status": x.status_code, "body": x.text,
                              "http_version": x.http_version,
                              "same_connection": same}), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    l = sub.add_parser("load")
    l.add_argument("url")
    l.add_argument("--tasks", type=int, default=4)
    l.add_argument("--post", action="store_true")
    i = sub.add_parser("idle")
    i.add_argument("url")
    b = sub.add_parser("busy")
    b.add_argument("url")
    b.add_argument("slow_url")
    args = p.parse_args()
    asyncio.run({"load": load, "idle": idle, "busy": busy}[args.cmd](args))


if __name__ == "__main__":
    main()
