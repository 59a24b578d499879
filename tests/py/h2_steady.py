#!/usr/bin/env python3
"""One HTTP/2 connection (h2c) used as a steady client uses it: a GET every EVERY seconds,
at most COUNT of them, then idle, until the server says GOAWAY (no new stream is started
after it, as RFC 9113 §6.8 asks) or FOR seconds pass.

    h2_steady.py --port P --service S [--every 0.2] [--count N] [--for 30]

Prints one JSON line: the requests answered 200, those answered otherwise or reset, the
GOAWAY's error code (null if none came), the seconds from the first request to it, and
the requests still open when the connection ended.
"""
import argparse
import json
import socket
import time

import h2.config
import h2.connection
import h2.events


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--every", type=float, default=0.2)
    p.add_argument("--count", type=int, default=1 << 30)
    p.add_argument("--for", dest="total", type=float, default=30.0)
    a = p.parse_args()

    s = socket.create_connection(("127.0.0.1", a.port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    out = {"ok": 0, "bad": 0, "reset": 0, "goaway": None, "goaway_after_s": None}
    began = time.monotonic()
    next_at = began
    sent = 0
    open_streams = {}
    ended = False
    buf = b""
    while not ended and time.monotonic() - began < a.total:
        now = time.monotonic()
        if out["goaway"] is None and sent < a.count and now >= next_at:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(
                sid,
                [
                    (":method", "GET"),
                    (":path", "/"),
                    (":scheme", "http"),
                    (":authority", "localhost"),
                    ("fed-service", a.service),
                ],
                end_stream=True,
            )
            open_streams[sid] = None
            sent += 1
            next_at = now + a.every
            s.sendall(conn.data_to_send())
        s.settimeout(max(0.01, min(0.1, next_at - time.monotonic())))
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not data:
            break
        buf += data
        events = []
        # frame by frame: a GOAWAY is read here and kept from the h2 library, which
        # would end every stream with it, so that the streams below its last stream id
        # are still seen answered (or not)
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            frame, buf = buf[: 9 + length], buf[9 + length :]
            if frame[3] == 0x7:
                if out["goaway"] is None:
                    out["goaway"] = int.from_bytes(frame[13:17], "big")
                    out["goaway_after_s"] = round(time.monotonic() - began, 2)
                continue
            events += conn.receive_data(frame)
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers).get(b":status")
                open_streams[ev.stream_id] = status
            elif isinstance(ev, h2.events.StreamEnded):
                if open_streams.pop(ev.stream_id, None) == b"200":
                    out["ok"] += 1
                else:
                    out["bad"] += 1
            elif isinstance(ev, h2.events.StreamReset):
                open_streams.pop(ev.stream_id, None)
                out["reset"] += 1
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        pending = conn.data_to_send()
        if pending:
            try:
                s.sendall(pending)
            except OSError:
                break
        if out["goaway"] is not None and not open_streams:
            ended = True
    out["unanswered"] = len(open_streams)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
