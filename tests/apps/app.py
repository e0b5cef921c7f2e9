#!/usr/bin/env python3
"""A small HTTP app for gracesrv's tests (the standard library only).

It takes its socket from systemd socket activation (fd 3, LISTEN_FDS=1), or
binds 127.0.0.1:$PORT when given PORT. It answers every request with its
pid and version: "pid P version V\n".

What it does is read at start from files in its working directory:
  version  the version it reports (default "0")
  mode     ok (default) | exit (exits 3 at start) | hang (never answers)
           | crash-after-first (exits after its first answer)
Paths: /healthz answers 200; /slow answers after 5 s; /echo answers with
the request body's length; anything else answers the version line.
"""

import os
import socket
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
answered = 0
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        global answered
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
        data = text.encode()
        self.send_response(200)
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


def main():
    if MODE == "exit":
        sys.exit(3)
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
    server.serve_forever()


if __name__ == "__main__":
    main()
