"""A gRPC server for the proxy tests (grpcio, no generated code: the
methods take and give raw bytes).

    server.py PORT [CERT KEY]    h2c, or TLS with CERT and KEY

Methods of service test.Echo:
  Unary(bytes) -> the same bytes, with b"pid:" and this pid before them
  Count(n as text) -> n messages, one every 20 ms (server streaming)
  Chat(stream) -> each message echoed as it arrives (bidirectional)
Prints "ready" once it serves. Trailers carry x-echo-trailer: done.
"""
import os
import sys
import time
from concurrent import futures

import grpc


def unary(request, context):
    context.set_trailing_metadata((("x-echo-trailer", "done"),))
    return b"pid:%d:" % os.getpid() + request


def count(request, context):
    for i in range(int(request)):
        time.sleep(0.02)
        yield b"%d" % i


def chat(requests, context):
    for message in requests:
        yield message


def main():
    port, tls = sys.argv[1], sys.argv[2:]
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((handler,))
    addr = "127.0.0.1:" + port
    if tls:
        with open(tls[0], "rb") as c, open(tls[1], "rb") as k:
            creds = grpc.ssl_server_credentials(((k.read(), c.read()),))
        server.add_secure_port(addr, creds)
    else:
        server.add_insecure_port(addr)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
