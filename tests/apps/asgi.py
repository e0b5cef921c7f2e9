"""An ASGI app for gracesrv's tests, served by a real ASGI server (uvicorn,
from Debian) given its socket as `--fd 3`. It answers "pid P version V",
V read from the file `version` in its working directory at start."""

import os

try:
    with open("version") as f:
        VERSION = f.read().strip() or "0"
except FileNotFoundError:
    VERSION = "0"


async def application(scope, receive, send):
    if scope["type"] != "http":
        return
    body = ("pid %d version %s\n" % (os.getpid(), VERSION)).encode()
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})
