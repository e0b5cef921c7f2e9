"""An HTTP/3 client for gracesrv's tests, on aioquic (not quinn or h3, the
server's own libraries, so that a protocol mistake they share shows up).

    client.py get URL [--count N] [--pause S] [--method M] [--body-size N] [--header K:V]
                      [--sni NAME]
        N requests one after another on one connection; prints one JSON
        object: {"responses": [{"status", "headers", "body"}...], "error",
        "sans": the DNS names of the certificate the server sent}.

    client.py parallel URL --connections C
        C connections at once, one request each; prints {"ok", "errors"}.

    client.py malformed URL --proxy PATH
        On one connection, one request for each malformation of RFC 9114
        sections 4.2 and 4.3 (and bodies that break their content-length,
        sent to PATH, a route that reads them), then a good request; prints
        {"CASE": {"status", "reset", "stop_sending"}...} with the error
        codes the server reset or stopped each stream with.

    client.py goaway URL [--busy]
        One connection; prints "connected" once it is; with --busy, GETs one
        after another (the next as soon as the last is answered, and none
        past a GOAWAY's ID) until the server closes the connection. Reads
        every GOAWAY frame on the server's control stream (aioquic itself
        discards their IDs) and prints {"goaways": [ID...], "answered":
        [stream ID...], "rejected": [...], "failed": [...], "closed"}.

    client.py load URL --connections C [--fresh F]
        Requests on C connections, one at a time each (and on F workers that
        open a new connection for every request), until stdin closes;
        then prints {"ok", "failed", "retried", "errors", "pids",
        "connections"}. A request the server refused unprocessed
        (H3_REQUEST_REJECTED, RFC 9114 section 4.1.1) is retried on a new
        connection and counted in "retried"; any other request without a
        complete response is "failed". After a refusal a connection is
        replaced, as after a GOAWAY (aioquic does not report GOAWAY).
        "pids" counts the body of each answer (the route answers "{pid}").
"""

import argparse
import asyncio
import json
import ssl
import sys
import threading
from urllib.parse import urlparse

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, ErrorCode, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)


class Rejected(Exception):
    """The server did not process the request: safe to retry."""


class Failed(Exception):
    pass


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.streams = {}
        self.terminated = None
        # Stream: the code of the server's RESET_STREAM, of its STOP_SENDING.
        self.resets = {}
        self.stops = {}
        # The server's unidirectional streams as received, and the IDs of
        # the GOAWAY frames on its control stream, in order.
        self.uni = {}
        self.goaways = []
        self.goaway = asyncio.Event()
        self.closed = asyncio.Event()

    def read_control(self, event):
        """Follows the server's control stream (type 0x00) to its GOAWAYs."""
        if event.stream_id % 4 != 3:
            return
        buf = self.uni.setdefault(event.stream_id, {"data": b"", "at": 0, "kind": None})
        buf["data"] += event.data
        while True:
            at = buf["at"]
            if buf["kind"] is None:
                kind, at = varint(buf["data"], at)
                if kind is None:
                    return
                buf["kind"], buf["at"] = kind, at
                continue
            if buf["kind"] != 0:
                return
            ftype, at = varint(buf["data"], at)
            length, at = varint(buf["data"], at) if ftype is not None else (None, at)
            if length is None or len(buf["data"]) < at + length:
                return
            if ftype == 0x7:
                self.goaways.append(varint(buf["data"][at : at + length], 0)[0])
                self.goaway.set()
            buf["at"] = at + length

    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived):
            self.read_control(event)
        if isinstance(event, ConnectionTerminated):
            self.terminated = f"connection closed: {event.error_code:#x} {event.reason_phrase}"
            self.closed.set()
            for s in self.streams.values():
                if not s["done"].done():
                    s["done"].set_exception(Failed(self.terminated))
            return
        if isinstance(event, StopSendingReceived):
            self.stops[event.stream_id] = event.error_code
            return
        if isinstance(event, StreamReset):
            self.resets[event.stream_id] = event.error_code
        if isinstance(event, StreamReset) and event.stream_id in self.streams:
            s = self.streams[event.stream_id]
            if not s["done"].done():
                if event.error_code == ErrorCode.H3_REQUEST_REJECTED:
                    s["done"].set_exception(Rejected())
                else:
                    s["done"].set_exception(Failed(f"stream reset: {event.error_code:#x}"))
            return
        for ev in self.h3.handle_event(event):
            s = self.streams.get(getattr(ev, "stream_id", None))
            if s is None:
                continue
            if isinstance(ev, HeadersReceived):
                if s["headers"] is None:
                    s["headers"] = ev.headers
            elif isinstance(ev, DataReceived):
                s["body"] += ev.data
            if getattr(ev, "stream_ended", False) and not s["done"].done():
                s["done"].set_result(None)

    async def raw(self, fields, body=b"", end=True):
        """Sends `fields` exactly as given (order, repeats), then `body`;
        waits for the answer or a reset: (status or None, reset code)."""
        sid = self._quic.get_next_available_stream_id()
        s = {"headers": None, "body": b"", "done": asyncio.get_running_loop().create_future()}
        self.streams[sid] = s
        self.h3.send_headers(sid, fields, end_stream=not body and end)
        if body:
            self.h3.send_data(sid, body, end_stream=end)
        self.transmit()
        reset = None
        try:
            await asyncio.wait_for(s["done"], 10)
        except (Failed, Rejected):
            reset = self.resets.get(sid)
        finally:
            del self.streams[sid]
        headers = {k.decode(): v.decode() for k, v in s["headers"] or []}
        status = int(headers[":status"]) if ":status" in headers else None
        return status, reset, self.stops.get(sid)

    async def request(self, method, url, body=b"", headers=()):
        if self.terminated:
            raise Failed(self.terminated)
        u = urlparse(url)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        sid = self._quic.get_next_available_stream_id()
        s = {"headers": None, "body": b"", "done": asyncio.get_running_loop().create_future()}
        self.streams[sid] = s
        self.h3.send_headers(
            sid,
            [
                (b":method", method.encode()),
                (b":scheme", b"https"),
                (b":authority", u.netloc.encode()),
                (b":path", path.encode()),
                (b"user-agent", b"aioquic-test"),
                *([(b"content-length", str(len(body)).encode())] if body else []),
                *headers,
            ],
            end_stream=not body,
        )
        if body:
            self.h3.send_data(sid, body, end_stream=True)
        self.transmit()
        try:
            await s["done"]
        finally:
            del self.streams[sid]
        headers = {k.decode(): v.decode() for k, v in s["headers"] or []}
        return int(headers.get(":status", "0")), headers, s["body"]


def varint(data, at):
    """A QUIC variable-length integer at `at`: (value, next), or (None, at)."""
    if at >= len(data):
        return None, at
    n = 1 << (data[at] >> 6)
    if at + n > len(data):
        return None, at
    v = data[at] & 0x3F
    for b in data[at + 1 : at + n]:
        v = (v << 8) | b
    return v, at + n


def configuration(sni=None):
    c = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=sni)
    c.verify_mode = ssl.CERT_NONE
    c.idle_timeout = 30.0
    return c


def opened(url, sni=None):
    u = urlparse(url)
    return connect(
        u.hostname,
        u.port or 443,
        configuration=configuration(sni),
        create_protocol=Client,
        wait_connected=True,
    )


async def get(args):
    out = {"responses": [], "error": None, "sans": []}
    try:
        async with opened(args.url, args.sni) as client:
            from cryptography import x509

            cert = client._quic.tls._peer_certificate
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            out["sans"] = san.value.get_values_for_type(x509.DNSName)
            for i in range(args.count):
                if i > 0 and args.pause:
                    await asyncio.sleep(args.pause)
                extra = [
                    tuple(x.strip().encode() for x in h.split(":", 1)) for h in args.header
                ]
                status, headers, body = await asyncio.wait_for(
                    client.request(args.method, args.url, b"x" * args.body_size, extra), 60
                )
                out["responses"].append(
                    {"status": status, "headers": headers, "body": body.decode(errors="replace")}
                )
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out), flush=True)


async def load(args):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def watch_stdin():
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    totals = {"ok": 0, "failed": 0, "retried": 0, "errors": [], "pids": {}, "connections": 0}

    async def worker():
        while not stop.is_set():
            try:
                async with opened(args.url) as client:
                    totals["connections"] += 1
                    while not stop.is_set():
                        try:
                            status, _, body = await asyncio.wait_for(
                                client.request("GET", args.url), 30
                            )
                        except Rejected:
                            totals["retried"] += 1
                            break
                        if status != 200:
                            raise Failed(f"status {status}")
                        totals["ok"] += 1
                        pid = body.decode().strip()
                        totals["pids"][pid] = totals["pids"].get(pid, 0) + 1
            except Exception as e:  # noqa: BLE001 - counted
                totals["failed"] += 1
                if len(totals["errors"]) < 10:
                    totals["errors"].append(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.05)

    async def fresh():
        while not stop.is_set():
            try:
                async with opened(args.url) as client:
                    totals["connections"] += 1
                    status, _, body = await asyncio.wait_for(client.request("GET", args.url), 30)
                    if status != 200:
                        raise Failed(f"status {status}")
                    totals["ok"] += 1
                    pid = body.decode().strip()
                    totals["pids"][pid] = totals["pids"].get(pid, 0) + 1
            except Rejected:
                totals["retried"] += 1
            except Exception as e:  # noqa: BLE001 - counted
                totals["failed"] += 1
                if len(totals["errors"]) < 10:
                    totals["errors"].append(f"fresh {type(e).__name__}: {e}")
                await asyncio.sleep(0.05)

    await asyncio.gather(
        *(worker() for _ in range(args.connections)), *(fresh() for _ in range(args.fresh))
    )
    print(json.dumps(totals), flush=True)


async def goaway(args):
    out = {"goaways": [], "answered": [], "rejected": [], "failed": [], "closed": False}
    async with opened(args.url) as client:
        print("connected", flush=True)
        if args.busy:
            while not client.terminated:
                sid = client._quic.get_next_available_stream_id()
                if client.goaways and sid >= min(client.goaways):
                    break
                try:
                    status, _, _ = await asyncio.wait_for(client.request("GET", args.url), 10)
                    (out["answered"] if status == 200 else out["failed"]).append(sid)
                except Rejected:
                    out["rejected"].append(sid)
                except Exception:  # noqa: BLE001 - counted
                    out["failed"].append(sid)
        try:
            await asyncio.wait_for(client.closed.wait(), 15)
            out["closed"] = True
        except asyncio.TimeoutError:
            pass
        out["goaways"] = client.goaways
    print(json.dumps(out), flush=True)


async def parallel(args):
    out = {"ok": 0, "errors": []}

    async def one():
        try:
            async with opened(args.url) as client:
                status, _, _ = await asyncio.wait_for(client.request("GET", args.url), 60)
                if status == 200:
                    out["ok"] += 1
                else:
                    out["errors"].append(f"status {status}")
        except Exception as e:  # noqa: BLE001 - reported
            out["errors"].append(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(one() for _ in range(args.connections)))
    print(json.dumps(out), flush=True)


async def malformed(args):
    u = urlparse(args.url)
    host = u.netloc.encode()
    get = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", host), (b":path", b"/")]
    post = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", host),
            (b":path", args.proxy.encode())]
    cases = [
        ("repeated :path", get + [(b":path", b"/other")], b""),
        ("pseudo-header after a regular field",
         get[:2] + [(b"x-a", b"b")] + get[2:], b""),
        (":status in a request", get + [(b":status", b"200")], b""),
        ("connection", get + [(b"connection", b"close")], b""),
        ("te gzip", get + [(b"te", b"gzip")], b""),
        ("transfer-encoding", get + [(b"transfer-encoding", b"chunked")], b""),
        ("content-length not a number", post + [(b"content-length", b"ten")], b"0123456789"),
        ("content-length 3 and 5", post + [(b"content-length", b"3"), (b"content-length", b"5")],
         b"abc"),
        ("10 declared, 5 sent", post + [(b"content-length", b"10")], b"01234"),
        ("5 declared, 10 sent", post + [(b"content-length", b"5")], b"0123456789"),
        ("te trailers (allowed)", get + [(b"te", b"trailers")], b""),
        ("an unread body (allowed)", [(b":method", b"POST")] + get[1:] + [(b"content-length", b"200000")],
         b"x" * 200000),
        ("good", get, b""),
    ]
    out = {}
    async with opened(args.url) as client:
        for name, fields, body in cases:
            status, reset, stop = await client.raw(fields, body)
            out[name] = {"status": status, "reset": reset, "stop_sending": stop}
    print(json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("get")
    g.add_argument("url")
    g.add_argument("--count", type=int, default=1)
    g.add_argument("--method", default="GET")
    g.add_argument("--body-size", type=int, default=0)
    g.add_argument("--header", action="append", default=[])
    g.add_argument("--pause", type=float, default=0.0)
    g.add_argument("--sni", default=None)
    l = sub.add_parser("load")
    l.add_argument("url")
    l.add_argument("--connections", type=int, default=4)
    l.add_argument("--fresh", type=int, default=0)
    par = sub.add_parser("parallel")
    par.add_argument("url")
    par.add_argument("--connections", type=int, default=100)
    ga = sub.add_parser("goaway")
    ga.add_argument("url")
    ga.add_argument("--busy", action="store_true")
    m = sub.add_parser("malformed")
    m.add_argument("url")
    m.add_argument("--proxy", required=True)
    args = p.parse_args()
    run = {"get": get, "load": load, "parallel": parallel, "malformed": malformed,
           "goaway": goaway}[args.cmd]
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
