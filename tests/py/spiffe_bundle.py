"""SPIFFE trust bundles with libraries nobody here wrote: PyJWT reads the JWKS (RFC
7517), `cryptography` the certificates, and the `spiffe` package (py-spiffe) the X.509
authorities.

  spiffe_bundle.py check FILE DOMAIN   reads a bundle fedport wrote; prints what it saw
  spiffe_bundle.py make OUT SEQ HINT CA_PEM...
                                       writes a bundle as another implementation would,
                                       with a jwt-svid key beside the x509-svid ones
  spiffe_bundle.py serve CERT KEY FILE  serves FILE at / over TLS; prints the port
"""
import base64
import http.server
import json
import ssl
import sys

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def b64url(n, size):
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


def check(path, domain):
    from spiffe import TrustDomain, X509Bundle

    doc = json.load(open(path))
    keys = jwt.PyJWKSet.from_dict(doc)  # RFC 7517 parameters, as PyJWT reads them
    out = {"keys": 0, "sequence": doc.get("spiffe_sequence"), "refresh_hint": doc.get("spiffe_refresh_hint")}
    ders = b""
    for raw, parsed in zip(doc["keys"], keys.keys):
        assert raw["use"] == "x509-svid", raw
        assert "kid" not in raw, "an x509-svid key has no kid (X509-SVID §6.1)"
        assert len(raw["x5c"]) == 1, raw
        der = base64.b64decode(raw["x5c"][0])
        cert = x509.load_der_x509_certificate(der)
        # the JWK's public key is the certificate's
        want = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        got = parsed.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert want == got, "the JWK's key is not the certificate's"
        ders += der
        out["keys"] += 1
    bundle = X509Bundle.parse_raw(TrustDomain(domain), ders)
    out["authorities"] = sorted(
        c.subject.rfc4514_string() for c in bundle.x509_authorities
    )
    print(json.dumps(out))


def make(out, seq, hint, cas):
    keys = [
        {
            "use": "jwt-svid",
            "kid": "k1",
            "kty": "EC",
            "crv": "P-256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        }
    ]
    for path in cas:
        for pem in open(path).read().split("-----END CERTIFICATE-----")[:-1]:
            cert = x509.load_pem_x509_certificate((pem + "-----END CERTIFICATE-----\n").encode())
            pub = cert.public_key()
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            n = pub.public_numbers()
            keys.append(
                {
                    "use": "x509-svid",
                    "kty": "EC",
                    "crv": "P-256",
                    "x": b64url(n.x, 32),
                    "y": b64url(n.y, 32),
                    "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
                }
            )
    doc = {"keys": keys, "spiffe_sequence": int(seq), "spiffe_refresh_hint": int(hint)}
    with open(out, "w") as f:
        json.dump(doc, f)


def serve(cert, key, path):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = open(path, "rb").read()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(srv.server_address[1], flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "check":
        check(sys.argv[2], sys.argv[3])
    elif cmd == "make":
        make(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    elif cmd == "serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
