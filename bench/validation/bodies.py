"""Writes the benchmark's request bodies into DIR: order.grpc (one gRPC-framed Order
message, protobuf, about 1 KiB) and order.json (the order with four of its lines as JSON, about 1 KiB).

usage: bodies.py DIR
"""
import json
import struct
import sys


def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return key + varint(len(data)) + data


def money(m):
    return field(1, 2, m["currency"]) + field(2, 0, m["units"]) + field(3, 0, m["nanos"])


def line(l):
    b = field(1, 2, l["sku"]) + field(2, 2, l["title"]) + field(3, 0, l["quantity"])
    b += field(4, 2, money(l["unit_price"]))
    return b + b"".join(field(5, 2, t) for t in l["tags"])


order = {
    "id": "ord-0123456789ab",
    "customer_id": "cust-42-eu-west",
    "lines": [
        {
            "sku": f"SKU-{i:04d}-BLUE",
            "title": f"Stainless steel water bottle, 750 ml, model {i}",
            "quantity": i + 1,
            "unit_price": {"currency": "EUR", "units": 19 + i, "nanos": 990000000},
            "tags": ["kitchen", "outdoor", "gift-eligible"],
        }
        for i in range(7)
    ],
    "ship_to": {
        "name": "Ada Lovelace",
        "street": "12 St James's Square",
        "city": "London",
        "postal_code": "SW1Y 4JH",
        "country": "GB",
    },
    "labels": {"channel": "web", "campaign": "winter-2026", "priority": "standard"},
    "created_unix_ms": 1795000000000,
    "gift": True,
    "note": "Please leave the parcel with the concierge if nobody answers.",
}

msg = field(1, 2, order["id"]) + field(2, 2, order["customer_id"])
msg += b"".join(field(3, 2, line(l)) for l in order["lines"])
a = order["ship_to"]
msg += field(4, 2, b"".join(field(i + 1, 2, a[k]) for i, k in enumerate(["name", "street", "city", "postal_code", "country"])))
msg += b"".join(field(5, 2, field(1, 2, k) + field(2, 2, v)) for k, v in order["labels"].items())
msg += field(6, 0, order["created_unix_ms"]) + field(7, 0, 1) + field(8, 2, order["note"])

d = sys.argv[1]
open(f"{d}/order.grpc", "wb").write(b"\x00" + struct.pack(">I", len(msg)) + msg)
# JSON spends more bytes on the same order: four lines make about 1 KiB
doc = json.dumps(dict(order, lines=order["lines"][:4]), separators=(",", ":")).encode()
open(f"{d}/order.json", "wb").write(doc)
print(f"protobuf message {len(msg)} bytes, JSON document {len(doc)} bytes")
