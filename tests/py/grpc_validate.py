"""Sends valid and malformed protobuf through fedport with raw-bytes serializers (a
generic stub) and prints the status of each as one JSON object.

usage: grpc_validate.py HOST:PORT CA CERT KEY
"""
import json
import sys

import grpc

target, ca, cert, key = sys.argv[1:5]
rd = lambda p: open(p, "rb").read()
ch = grpc.secure_channel(
    target,
    grpc.ssl_channel_credentials(rd(ca), rd(key), rd(cert)),
    options=(("grpc.ssl_target_name_override", "localhost"),),
)
ident = lambda b: b
out = {}


def unary(name, method, payload):
    try:
        ch.unary_unary(method, ident, ident)(payload, timeout=10)
        out[name] = {"code": "OK"}
    except grpc.RpcError as e:
        out[name] = {"code": e.code().name, "details": e.details()}


unary("valid", "/test.Echo/Say", b"\x0a\x05hello")
unary("bad_utf8", "/test.Echo/Say", b"\x0a\x02\xff\xfe")
unary("wrong_wire_type", "/test.Echo/Say", b"\x0d\x01\x02\x03\x04")
unary("truncated", "/test.Echo/Say", b"\x0a\x05he")
unary("unknown_field", "/test.Echo/Say", b"\x10\x01")
unary("not_in_schema", "/test.Echo/Nope", b"")

msgs = [b"\x0a\x02m" + bytes([48 + i]) for i in range(10)]
msgs[2] = b"\x0a\x02\xff\xfe"
got = []
stream = ch.stream_stream("/test.Echo/Chat", ident, ident)(iter(msgs), timeout=10)
try:
    for m in stream:
        got.append(m.hex())
    out["stream"] = {"code": "OK", "got": got}
except grpc.RpcError as e:
    out["stream"] = {"code": e.code().name, "details": e.details(), "got": got}

stats = ch.unary_unary("/test.Echo/Stats", ident, ident)(b"", timeout=10)
chat, say = stats[2:].decode().split("/")
out["upstream_chat_received"] = int(chat)
out["upstream_say_received"] = int(say)
print(json.dumps(out))
