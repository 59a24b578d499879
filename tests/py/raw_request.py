#!/usr/bin/env python3
"""One request, spelled exactly as asked: HTTP/1.1 as raw bytes, or HTTP/2 frames from the
h2 library with its own header validation and normalisation turned off, so that upper-case
or duplicate fields, odd methods and a `host` beside `:authority` go out as written.

    raw_request.py CASES_JSON --port P [--ca CA --cert CERT --key KEY]

CASES_JSON is a file holding a list of requests: {"proto": "h1"|"h2", "method", "path" (none
for CONNECT over HTTP/2),
"authority" (h2: `:authority`, omitted when null), "headers": [[name, value], ...],
"body_hex"}. Prints one JSON line per request: the status, the response headers (names
lower-cased, values joined with ", "), the body as text, and for HTTP/2 the reset code if
the stream was reset.
"""
import argparse
import json
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def connect(args, alpn):
    raw = socket.create_connection(("127.0.0.1", args.port), timeout=10)
    if not args.ca:
        return raw
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols([alpn])
    return ctx.wrap_socket(raw, server_hostname="localhost")


def h1(args, case):
    s = connect(args, "http/1.1")
    body = bytes.fromhex(case.get("body_hex", ""))
    lines = [f"{case['method']} {case['path']} HTTP/1.1"]
    for k, v in case["headers"]:
        lines.append(f"{k}: {v}")
    lines.append(f"content-length: {len(body)}")
    lines.append("connection: close")
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionError, ssl.SSLError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    first, *fields = head.decode("latin-1").split("\r\n")
    status = int(first.split(" ")[1]) if first.startswith("HTTP/") else 0
    headers = {}
    for f in fields:
        k, _, v = f.partition(":")
        k = k.strip().lower()
        headers[k] = (headers[k] + ", " if k in headers else "") + v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, rest2 = b"", rest
        while rest2:
            size, _, rest2 = rest2.partition(b"\r\n")
            n = int(size.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            out, rest2 = out + rest2[:n], rest2[n + 2 :]
        rest = out
    return {"status": status, "headers": headers, "body": rest.decode("utf-8", "replace")}


def h2req(args, case):
    s = connect(args, "h2")
    cfg = h2.config.H2Configuration(
        client_side=True,
        header_encoding="utf-8",
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    conn = h2.connection.H2Connection(config=cfg)
    conn.initiate_connection()
    body = bytes.fromhex(case.get("body_hex", ""))
    if case["method"] == "CONNECT":
        # RFC 9113 8.5: :authority only
        hdrs = [(":method", "CONNECT")]
    else:
        hdrs = [(":method", case["method"]), (":scheme", "https" if args.ca else "http"), (":path", case["path"])]
    if case.get("authority") is not None:
        hdrs.append((":authority", case["authority"]))
    hdrs += [(k, v) for k, v in case["headers"]]
    conn.send_headers(1, hdrs, end_stream=not body and case["method"] != "CONNECT")
    if body:
        conn.send_data(1, body, end_stream=True)
    s.sendall(conn.data_to_send())
    out = {"status": 0, "headers": {}, "body": "", "reset": None}
    data = b""
    done = False
    while not done:
        try:
            chunk = s.recv(65536)
        except (ConnectionError, ssl.SSLError, socket.timeout):
            break
        if not chunk:
            break
        for ev in conn.receive_data(chunk):
            if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                for k, v in ev.headers:
                    k = k.decode() if isinstance(k, bytes) else k
                    v = v.decode() if isinstance(v, bytes) else v
                    if k == ":status":
                        out["status"] = int(v)
                    else:
                        h = out["headers"]
                        h[k] = (h[k] + ", " if k in h else "") + v
            elif isinstance(ev, h2.events.DataReceived):
                data += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                done = True
            elif isinstance(ev, h2.events.StreamReset):
                out["reset"] = int(ev.error_code)
                done = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                done = True
        s.sendall(conn.data_to_send())
    s.close()
    out["body"] = data.decode("utf-8", "replace")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cases")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    args = p.parse_args()
    for case in json.load(open(args.cases)):
        r = h1(args, case) if case["proto"] == "h1" else h2req(args, case)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    sys.exit(main())
