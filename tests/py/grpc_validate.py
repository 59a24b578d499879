"""Sends valid and malformed protobuf through fedport with raw-bytes serializers (a
generic stub) and prints the status of each as one JSON object.

usage: grpc_validate.py HOST:PORT CA CERT KEY
"""
import gzip
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


def unary(name, method, payload, compression=None):
    try:
        ch.unary_unary(method, ident, ident)(payload, timeout=10, compression=compression)
        out[name] = {"code": "OK"}
    except grpc.RpcError as e:
        out[name] = {"code": e.code().name, "details": e.details()}


unary("valid", "/test.Echo/Say", b"\x0a\x05hello")
unary("bad_utf8", "/test.Echo/Say", b"\x0a\x02\xff\xfe")
unary("wrong_wire_type", "/test.Echo/Say", b"\x0d\x01\x02\x03\x04")
unary("truncated", "/test.Echo/Say", b"\x0a\x05he")
unary("unknown_field", "/test.Echo/Say", b"\x10\x01")
unary("not_in_schema", "/test.Echo/Nope", b"")

# compressed: gzip is decompressed to be validated, within the message limit
gz = grpc.Compression.Gzip
unary("gzip_valid", "/test.Echo/Say", b"\x0a\x05hello", gz)
unary("gzip_bad_utf8", "/test.Echo/Say", b"\x0a\x02\xff\xfe", gz)
n = 64 << 20  # a 64 MiB string of one letter: about 64 KiB gzipped
varint = bytearray()
v = n
while v >= 0x80:
    varint.append((v & 0x7F) | 0x80)
    v >>= 7
varint.append(v)
bomb = b"\x0a" + bytes(varint) + b"a" * n
out["bomb_wire_bytes"] = len(gzip.compress(bomb))
unary("gzip_bomb", "/test.Echo/Say", bomb, gz)
del bomb
unary("deflate", "/test.Echo/Say", b"\x0a\x05hello", grpc.Compression.Deflate)

# proto2 required fields, at any depth, and a response checked against its type
unary("order_valid", "/legacy.Shop/Place", b"\x0a\x02o1\x12\x05\x0a\x01a\x10\x02")
unary("order_missing_id", "/legacy.Shop/Place", b"\x12\x03\x0a\x01a")
unary("item_missing_sku", "/legacy.Shop/Place", b"\x0a\x02o1\x12\x02\x10\x02")
unary("map_item_missing_sku", "/legacy.Shop/Place", b"\x0a\x02o1\x1a\x07\x0a\x01k\x12\x02\x10\x01")
unary("broken_response", "/legacy.Shop/Broken", b"\x0a\x02o1")

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
chat, say, completed = stats[2:].decode().split("/")
out["upstream_chat_received"] = int(chat)
out["upstream_chat_completed"] = int(completed)
out["upstream_say_received"] = int(say)
print(json.dumps(out))
