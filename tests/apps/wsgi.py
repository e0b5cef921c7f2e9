"""A WSGI app for gracesrv's tests, served by a real application server
(gunicorn, from Debian) that takes its socket from fd 3. It answers
"pid P version V", V read from the file `version` in its working directory
when the worker starts."""

import os

try:
    with open("version") as f:
        VERSION = f.read().strip() or "0"
except FileNotFoundError:
    VERSION = "0"


def application(environ, start_response):
    body = ("pid %d version %s\n" % (os.getpid(), VERSION)).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
