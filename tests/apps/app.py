#!/usr/bin/env python3
"""A small HTTP app for gracesrv's tests (the standard library only).

It takes its socket from systemd socket activation (fd 3, LISTEN_FDS=1), or
binds 127.0.0.1:$PORT when given PORT. It answers every request with its
pid and version: "pid P version V\n".

What it does is read at start from files in its working directory:
  version  the version it reports (default "0")
  mode     ok (default) | exit (exits 3 at start) | hang (never answers)
           | crash-after-first (exits after its first answer)
           | ignore-term (ignores SIGTERM)
           | errors (answers 500 to one request in ten, /healthz aside)
  delay    milliseconds each answer waits (default 0; /healthz aside)
Paths: /healthz answers 200; /slow answers after 5 s; /echo answers with
the request body's length; /ws is a WebSocket that echoes text frames and
writes the close code it gets to the file `ws-close`; anything else
answers the version line. With NOTIFY_SOCKET set, it sends READY=1 there
once it serves.
"""

import base64
import hashlib
import os
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def read(name, default):
    try:
        with open(name) as f:
            return f.read().strip() or default
    except FileNotFoundError:
        return default


VERSION = read("version", "0")
MODE = read("mode", "ok")
DELAY = float(read("delay", "0")) / 1000
answered = 0
counted = 0
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffered: the head and the body leave in one write when the handler
    # flushes. Unbuffered, the body waits behind the head for its ACK
    # (Nagle's algorithm meeting the peer's delayed ACK): 40 ms a request.
    wbufsize = 64 * 1024

    def log_message(self, *args):
        pass

    def do_GET(self):
        global answered
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if self.path == "/slow":
            time.sleep(5)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path == "/healthz":
            text = "ok\n"
        elif self.path == "/echo":
            text = "got %d\n" % len(body)
        else:
            text = "pid %d version %s\n" % (os.getpid(), VERSION)
        status = 200
        if self.path != "/healthz":
            global counted
            if DELAY:
                time.sleep(DELAY)
            with lock:
                counted += 1
                nth = counted
            if MODE == "errors" and nth % 10 == 0:
                status, text = 500, "failed\n"
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        with lock:
            answered += 1
            if MODE == "crash-after-first":
                os._exit(1)

    do_POST = do_GET

    def websocket(self):
        self.close_connection = True
        key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:
                code = struct.unpack(">H", data[:2])[0] if len(data) >= 2 else 1005
                with open("ws-close", "w") as f:
                    f.write(str(code))
                self.wfile.write(bytes([0x88, len(data)]) + data)
                self.wfile.flush()
                return
            if opcode == 1:
                self.wfile.write(bytes([0x81, len(data)]) + data)
                self.wfile.flush()


def main():
    if MODE == "exit":
        sys.exit(3)
    if MODE == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("LISTEN_FDS") == "1" and os.environ.get("LISTEN_PID") == str(os.getpid()):
        sock = socket.socket(fileno=3)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(os.environ["PORT"])))
        sock.listen(128)
    if MODE == "hang":
        while True:
            time.sleep(3600)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    notify = os.environ.get("NOTIFY_SOCKET")
    if notify:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
            n.sendto(b"READY=1", "\0" + notify[1:] if notify.startswith("@") else notify)
    server.serve_forever()


if __name__ == "__main__":
    main()
