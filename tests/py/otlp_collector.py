"""A stand-in OTLP/HTTP collector: accepts POST /v1/traces (JSON) and appends each body
as one line to OUT. Prints its port, then serves until killed.

usage: otlp_collector.py OUT
"""
import http.server
import json
import sys

out = sys.argv[1]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        ok = self.path == "/v1/traces" and self.headers.get("content-type") == "application/json"
        if ok:
            json.loads(body)  # must be JSON
            with open(out, "ab") as f:
                f.write(body.replace(b"\n", b" ") + b"\n")
        self.send_response(200 if ok else 415)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *a):
        pass


srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print(srv.server_address[1], flush=True)
srv.serve_forever()
