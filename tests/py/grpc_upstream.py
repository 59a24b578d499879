"""A real gRPC server (grpcio) for fedport's tests: service test.Echo on h2c.

Say echoes its request and sends trailing metadata; Chat echoes every message of a
bidirectional stream; Fail aborts with NOT_FOUND and trailing metadata. legacy.Shop (proto2): Place
echoes, Broken answers an order without its required id. grpc.health.v1.Health/Check
answers SERVING until test.Echo/Unhealthy is called. Every method
tells, in initial metadata `seen-peer`, the `fed-peer` header fedport passed on.
Prints the bound port on stdout, then serves until killed.
"""
import sys
import threading
from concurrent import futures

import grpc


def _peer(ctx):
    return dict(ctx.invocation_metadata()).get("fed-peer", "")


SAY_RECEIVED = []


def say(req, ctx):
    SAY_RECEIVED.append(req)
    ctx.send_initial_metadata((("seen-peer", _peer(ctx)),))
    ctx.set_trailing_metadata((("x-trailer", "t1"),))
    return req


CHAT_RECEIVED = []
# Chat calls whose request stream ended cleanly (the handler ran to its end)
CHAT_COMPLETED = []


def chat(it, ctx):
    ctx.send_initial_metadata((("seen-peer", _peer(ctx)),))
    ended = threading.Event()
    ctx.add_callback(ended.set)  # runs when the call ends: at once if it was reset
    for m in it:
        CHAT_RECEIVED.append(m)
        yield m
    # A reset call ends the iteration too, and then the call ends. grpcio learns the two
    # from separate events, so the iteration may end an instant before the call is
    # known to be cancelled: it is given a moment. A call whose stream ended cleanly
    # stays active until this handler returns.
    if not ended.wait(0.2) and ctx.is_active():
        CHAT_COMPLETED.append(1)


def stats(req, ctx):
    # how many Chat messages and Say calls ever arrived, and Chat calls completed, as a
    # Msg with text "chat/say/completed"
    n = f"{len(CHAT_RECEIVED)}/{len(SAY_RECEIVED)}/{len(CHAT_COMPLETED)}".encode()
    return b"\x0a" + bytes([len(n)]) + n


def fail(req, ctx):
    ctx.send_initial_metadata((("seen-peer", _peer(ctx)),))
    ctx.set_trailing_metadata((("x-why", "because"),))
    ctx.abort(grpc.StatusCode.NOT_FOUND, "nothing here: é")


def place(req, ctx):
    SAY_RECEIVED.append(req)
    return req


def broken(req, ctx):
    # an Order whose required id is missing: one item with sku "x"
    return b"\x12\x03\x0a\x01x"


HEALTH = {"serving": True}


def health_check(req, ctx):
    # grpc.health.v1.HealthCheckResponse { status: SERVING (1) or NOT_SERVING (2) }
    return b"\x08\x01" if HEALTH["serving"] else b"\x08\x02"


def unhealthy(req, ctx):
    HEALTH["serving"] = False
    return b""


ident = lambda b: b
health = grpc.method_handlers_generic_handler(
    "grpc.health.v1.Health",
    {"Check": grpc.unary_unary_rpc_method_handler(health_check, ident, ident)},
)
shop = grpc.method_handlers_generic_handler(
    "legacy.Shop",
    {
        "Place": grpc.unary_unary_rpc_method_handler(place, ident, ident),
        "Broken": grpc.unary_unary_rpc_method_handler(broken, ident, ident),
    },
)
handler = grpc.method_handlers_generic_handler(
    "test.Echo",
    {
        "Say": grpc.unary_unary_rpc_method_handler(say, ident, ident),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, ident, ident),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, ident, ident),
        "Stats": grpc.unary_unary_rpc_method_handler(stats, ident, ident),
        "Unhealthy": grpc.unary_unary_rpc_method_handler(unhealthy, ident, ident),
    },
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_generic_rpc_handlers((handler, shop, health))
port = server.add_insecure_port(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
