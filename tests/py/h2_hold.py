#!/usr/bin/env python3
"""Messages that never finish: --conns mTLS HTTP/2 connections, each with --streams gRPC
calls that announce a --size byte message and send all of it but the last byte (under
flow control, as a client must), then hold still for --seconds.

    h2_hold.py --port P --ca CA --cert CERT --key KEY [--conns 4 --streams 8 --size N]

Prints one JSON object: how many calls sent their whole message but the last byte
(`held`), how many fedport answered meanwhile (`answered`, by grpc-status) or reset.
"""
import argparse
import json
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events


def one(args, out, lock):
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", args.port), timeout=10), server_hostname="localhost")
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    left, done, status = {}, set(), {}
    for i in range(args.streams):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [
            (":method", "POST"), (":scheme", "https"), (":path", args.path),
            (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
            # the test service reads the whole request before it answers, as a unary
            # gRPC handler does
            ("x-read-body", "1"),
        ])
        prefix = b"\x00" + args.size.to_bytes(4, "big")
        conn.send_data(sid, prefix)
        left[sid] = args.size - 1
    s.sendall(conn.data_to_send())
    s.settimeout(0.05)
    end = None
    while True:
        for sid, n in list(left.items()):
            if sid in done or n == 0:
                continue
            w = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, n)
            if w > 0:
                conn.send_data(sid, b"\x0a" * w)
                left[sid] = n - w
        data = conn.data_to_send()
        if data:
            try:
                s.sendall(data)
            except OSError:
                break
        try:
            chunk = s.recv(65536)
            if not chunk:
                break
            for ev in conn.receive_data(chunk):
                if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    for k, v in ev.headers:
                        if k in (b"grpc-status", "grpc-status"):
                            status[ev.stream_id] = v.decode() if isinstance(v, bytes) else v
                            done.add(ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset):
                    status.setdefault(ev.stream_id, "reset")
                    done.add(ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    done.add(ev.stream_id)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    end = time.monotonic()
            s.sendall(conn.data_to_send())
        except socket.timeout:
            pass
        except OSError:
            break
        all_sent = all(n == 0 or sid in done for sid, n in left.items())
        if all_sent and end is None:
            end = time.monotonic() + args.seconds
        if end is not None and time.monotonic() >= end:
            break
    held = sum(1 for sid, n in left.items() if n == 0 and sid not in done)
    with lock:
        out["held"] += held
        for v in status.values():
            out["answered"][v] = out["answered"].get(v, 0) + 1
    s.close()


def bombs(args):
    """One gRPC call (grpc-encoding gzip) sending small bombs for --seconds as fast as
    flow control allows: each message a few KiB that inflate to --size bytes of a valid
    message. Prints how many were sent."""
    import gzip as gz
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", args.port), timeout=10), server_hostname="localhost")
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    n = args.size - 6
    # field 1, a 4-byte varint length: 5 bytes of tag and length, then the string
    plain = b"\x0a" + bytes([0x80 | (n & 0x7F), 0x80 | ((n >> 7) & 0x7F), 0x80 | ((n >> 14) & 0x7F), (n >> 21) & 0x7F]) + b"a" * n
    z = gz.compress(plain, 9)
    msg = b"\x01" + len(z).to_bytes(4, "big") + z
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [
        (":method", "POST"), (":scheme", "https"), (":path", args.path), (":authority", "localhost"),
        ("content-type", "application/grpc"), ("grpc-encoding", "gzip"), ("te", "trailers"), ("x-read-body", "1"),
    ])
    s.sendall(conn.data_to_send())
    s.setblocking(False)
    total, buf, end = 0, b"", time.monotonic() + args.seconds
    pending_out = b""
    while time.monotonic() < end:
        if len(buf) < 1 << 20:
            buf += msg * 64
        # as much as the window allows
        while True:
            w = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(buf))
            if w <= 0:
                break
            conn.send_data(sid, buf[:w])
            total += w
            buf = buf[w:]
        pending_out += conn.data_to_send()
        try:
            if pending_out:
                n = s.send(pending_out)
                pending_out = pending_out[n:]
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
        except OSError:
            break
        try:
            chunk = s.recv(65536)
            if not chunk:
                break
            conn.receive_data(chunk)
            pending_out += conn.data_to_send()
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            time.sleep(0.0005)
        except OSError:
            break
    s.close()
    print(json.dumps({"bombs_sent": total // len(msg), "compressed": len(z), "inflated": len(plain)}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--size", type=int, default=2 << 20)
    p.add_argument("--path", default="/test.Echo/Say")
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--bombs", action="store_true")
    args = p.parse_args()
    if args.bombs:
        return bombs(args)
    out, lock = {"held": 0, "answered": {}}, threading.Lock()
    ts = [threading.Thread(target=one, args=(args, out, lock)) for _ in range(args.conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
