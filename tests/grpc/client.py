"""A gRPC client for the proxy tests (grpcio), through gracesrv.

    client.py ADDR MODE SECONDS [CA]

ADDR is host:port of gracesrv; with CA, TLS (the name checked is
localhost). MODE:
  unary   one channel, calls one after another for SECONDS
  stream  server-streaming calls (20 messages each) for SECONDS
  chat    one bidirectional stream, a message every 50 ms for SECONDS
Prints one JSON line: ok, failed, the first errors, and (unary) the
trailers seen.
"""
import json
import sys
import time

import grpc


def channel(addr, ca):
    if ca is None:
        return grpc.insecure_channel(addr)
    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.secure_channel(
        addr, creds, options=(("grpc.ssl_target_name_override", "localhost"),)
    )


def main():
    addr, mode, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    ca = sys.argv[4] if len(sys.argv) > 4 else None
    ch = channel(addr, ca)
    grpc.channel_ready_future(ch).result(timeout=10)
    ok, failed, errors, trailers = 0, 0, [], set()
    end = time.monotonic() + seconds

    def fail(e):
        nonlocal failed
        failed += 1
        if len(errors) < 5:
            errors.append(repr(e))

    if mode == "unary":
        call = ch.unary_unary("/test.Echo/Unary")
        n = 0
        while time.monotonic() < end:
            n += 1
            body = b"call %d" % n
            try:
                answer, c = call.with_call(body, timeout=10)
                if answer.endswith(body) and answer.startswith(b"pid:"):
                    ok += 1
                    trailers.update(k + "=" + v for k, v in c.trailing_metadata())
                else:
                    fail(answer)
            except grpc.RpcError as e:
                fail(e)
    elif mode == "stream":
        call = ch.unary_stream("/test.Echo/Count")
        while time.monotonic() < end:
            try:
                got = [m for m in call(b"20", timeout=10)]
                if got == [b"%d" % i for i in range(20)]:
                    ok += 1
                else:
                    fail(got)
            except grpc.RpcError as e:
                fail(e)
    elif mode == "chat":
        call = ch.stream_stream("/test.Echo/Chat")
        sent = []

        def messages():
            i = 0
            while time.monotonic() < end:
                i += 1
                m = b"m%d" % i
                sent.append(m)
                yield m
                time.sleep(0.05)

        try:
            got = list(call(messages(), timeout=seconds + 30))
            ok = sum(1 for a, b in zip(got, sent) if a == b)
            if got != sent:
                fail("got %d of %d messages" % (len(got), len(sent)))
        except grpc.RpcError as e:
            fail(e)
    print(json.dumps({"ok": ok, "failed": failed, "errors": errors, "trailers": sorted(trailers)}))


if __name__ == "__main__":
    main()
