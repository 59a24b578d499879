#!/usr/bin/env python3
"""Holds N mTLS HTTP/2 connections open to a proxy at a trickle, for measuring the memory
each open connection costs it.

    hold.py HOST PORT CA CERT KEY N [SECONDS]
    HOLD_IDLE=1 hold.py …   no trickle: after the first GET each connection sits idle

Each connection completes its TLS 1.3 handshake with the client certificate, speaks
HTTP/2 (ALPN h2) and sends one GET, so the proxy has set up whatever it keeps per
connection; then every connection sends one more GET every 2 s (the trickle) until
SECONDS have passed (with HOLD_IDLE=1 they send nothing more: idle connections beside a
load, answering only the proxy's keepalive PINGs). Prints "held N" once all are open and answered (the moment to read
the proxy's RSS), and at the end a JSON line with how many stayed open and answered.
Not a test: a bench helper. Needs Python's h2 (scripts/install-test-deps.sh).
"""
import json
import os
import selectors
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events

host, port, ca, cert, key, n = sys.argv[1:7]
port, n = int(port), int(n)
secs = float(sys.argv[7]) if len(sys.argv) > 7 else 10.0
idle = os.environ.get("HOLD_IDLE") == "1"

ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["h2"])
ctx.check_hostname = False
ctx.minimum_version = ssl.TLSVersion.TLSv1_3

sel = selectors.DefaultSelector()
conns = []


class Conn:
    def __init__(self):
        raw = socket.create_connection((host, port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.sock.setblocking(False)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.answered = 0
        self.open = True
        self.flush()
        sel.register(self.sock, selectors.EVENT_READ, self)

    def get(self):
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(":method", "GET"), (":path", "/"), (":scheme", "https"),
                                   (":authority", "localhost")], end_stream=True)
        self.flush()

    def flush(self):
        data = self.h2.data_to_send()
        while data:
            try:
                sent = self.sock.send(data)
                data = data[sent:]
            except (ssl.SSLWantWriteError, BlockingIOError):
                time.sleep(0.001)

    def read(self):
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLWantReadError, BlockingIOError):
            return
        except OSError:
            data = b""
        if not data:
            self.open = False
            sel.unregister(self.sock)
            return
        for ev in self.h2.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self.answered += 1
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.open = False
        self.flush()


def pump(until, want=None):
    while time.time() < until:
        for k, _ in sel.select(timeout=0.05):
            k.data.read()
        if want is not None and all(c.answered >= want or not c.open for c in conns):
            return


for _ in range(n):
    c = Conn()
    conns.append(c)
    c.get()
    pump(time.time() + 0.001)
pump(time.time() + 30, want=1)
print(f"held {sum(c.open for c in conns)}", flush=True)
end = time.time() + secs
while time.time() < end:
    for c in conns:
        if c.open and not idle:
            c.get()
    pump(min(end, time.time() + 2))
print(json.dumps({"open": sum(c.open for c in conns),
                  "answered": sum(c.answered for c in conns)}), flush=True)
