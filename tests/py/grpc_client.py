"""A real gRPC client (grpcio) for fedport's tests. Calls test.Echo through fedport's
mTLS port with raw-bytes (de)serializers and prints what it saw as one JSON object.

usage: grpc_client.py HOST:PORT CA CERT KEY
"""
import json
import sys

import grpc

target, ca, cert, key = sys.argv[1:5]
rd = lambda p: open(p, "rb").read()
creds = grpc.ssl_channel_credentials(rd(ca), rd(key), rd(cert))
ch = grpc.secure_channel(target, creds, options=(("grpc.ssl_target_name_override", "localhost"),))
ident = lambda b: b
out = {}

resp, call = ch.unary_unary("/test.Echo/Say", ident, ident).with_call(
    b"\x0a\x05hello", metadata=(("fed-peer", "spiffe://forged/admin"),), timeout=10
)
out["unary"] = {
    "response": resp.hex(),
    "code": call.code().name,
    "initial": dict(call.initial_metadata()),
    "trailing": dict(call.trailing_metadata()),
}

msgs = [bytes([0x0A, 3]) + f"m{i:02d}".encode() for i in range(20)]
stream = ch.stream_stream("/test.Echo/Chat", ident, ident)(iter(msgs), timeout=10)
got = [m.hex() for m in stream]
out["bidi"] = {"sent": [m.hex() for m in msgs], "got": got, "code": stream.code().name}

try:
    ch.unary_unary("/test.Echo/Fail", ident, ident)(b"", timeout=10)
    out["fail"] = {"code": "OK"}
except grpc.RpcError as e:
    out["fail"] = {"code": e.code().name, "details": e.details(), "trailing": dict(e.trailing_metadata() or ())}

try:
    ch.unary_unary("/nope.Missing/Call", ident, ident)(b"", timeout=10)
    out["unknown"] = {"code": "OK"}
except grpc.RpcError as e:
    out["unknown"] = {"code": e.code().name, "details": e.details()}

try:
    ch.unary_unary("/down.Svc/Call", ident, ident)(b"", timeout=10)
    out["down"] = {"code": "OK"}
except grpc.RpcError as e:
    out["down"] = {"code": e.code().name, "details": e.details()}

try:
    ch.unary_unary("/test.Echo/Secret", ident, ident)(b"", timeout=10)
    out["denied"] = {"code": "OK"}
except grpc.RpcError as e:
    out["denied"] = {"code": e.code().name, "details": e.details()}

try:
    ch.unary_unary("/test.Echo/Say", ident, ident)(b"\x0a\x82\x10" + b"x" * 2050, timeout=10)
    out["big"] = {"code": "OK"}
except grpc.RpcError as e:
    out["big"] = {"code": e.code().name, "details": e.details()}

resp, call = ch.unary_unary("/test.Echo/Say", ident, ident).with_call(b"\x0a\x02ok", timeout=10)
out["big_then_small"] = {"code": call.code().name}

print(json.dumps(out))
