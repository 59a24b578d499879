#!/usr/bin/env python3
"""Calls whose body arrives late: one mTLS HTTP/2 connection, --streams POSTs sent at once
with a small body announced by content-length, each body held back for --delay seconds
and then sent whole (END_STREAM), so that it reaches the service just before the
deadline. Extra request headers come as --header NAME:VALUE.

    h2_late_body.py --port P --ca CA --cert CERT --key KEY --service S [--streams 6]
                    [--delay 1.8] [--header x-sleep-ms:1500]

Prints one JSON object: the answers by status, and the fed-refused reasons seen.
"""
import argparse
import json
import socket
import ssl
import time

import h2.config
import h2.connection
import h2.events


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--streams", type=int, default=6)
    p.add_argument("--delay", type=float, default=1.8)
    p.add_argument("--header", action="append", default=[])
    args = p.parse_args()
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", args.port), timeout=30),
                        server_hostname="localhost")
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    body = b'{"late":true}'
    extra = [tuple(h.split(":", 1)) for h in args.header]
    sids = []
    for _ in range(args.streams):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [
            (":method", "POST"), (":scheme", "https"), (":path", "/late"),
            (":authority", "localhost"), ("fed-service", args.service),
            ("content-type", "application/json"), ("content-length", str(len(body))),
        ] + extra)
        sids.append(sid)
    s.sendall(conn.data_to_send())
    time.sleep(args.delay)
    for sid in sids:
        conn.send_data(sid, body, end_stream=True)
    s.sendall(conn.data_to_send())
    status, refused, done = {}, {}, set()
    s.settimeout(30)
    while len(done) < len(sids):
        data = s.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                h = {k.decode(): v.decode() for k, v in ev.headers}
                status[h[":status"]] = status.get(h[":status"], 0) + 1
                r = h.get("fed-refused")
                if r:
                    refused[r] = refused.get(r, 0) + 1
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                done.add(ev.stream_id)
        s.sendall(conn.data_to_send())
    print(json.dumps({"answered": status, "refused": refused}))


if __name__ == "__main__":
    main()
