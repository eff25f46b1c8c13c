"""A GCS service-account credential exercised for real: `service_account.json` is read, a JWT is
signed with its private key and exchanged at its `token_uri` (a local token endpoint here, that
checks the signature), and the access token is used against the GCS emulator. A key the
endpoint does not know is `credentials_invalid`."""

import base64
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sidecar import preflight, urls

pytestmark = pytest.mark.mount


def _b64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


class TokenEndpoint(ThreadingHTTPServer):
    """OAuth 2.0 JWT-bearer grant, as Google's token endpoint does it: verifies the assertion's
    RS256 signature with the public key registered for its issuer."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), self.Handler)
        self.keys, self.exchanges, self.refused = {}, 0, 0

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
            server = self.server
            try:
                head, claims, sig = form["assertion"][0].split(".")
                iss = json.loads(_b64(claims))["iss"]
                server.keys[iss].verify(_b64(sig), f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
                server.exchanges += 1
                body, status = {"access_token": f"tok-{uuid.uuid4().hex}", "expires_in": 3600, "token_type": "Bearer"}, 200
            except Exception:
                server.refused += 1
                body, status = {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, 400
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)


def _service_account(token_uri, key, email):
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    return json.dumps({"type": "service_account", "project_id": "test", "private_key_id": "k1", "private_key": pem,
                       "client_email": email, "client_id": "1", "token_uri": token_uri})


def test_service_account_json_is_signed_and_exchanged_and_a_wrong_key_is_invalid(gcs):
    endpoint = TokenEndpoint()
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    try:
        token_uri = f"http://127.0.0.1:{endpoint.server_address[1]}/token"
        email = "sidecar@test.iam.gserviceaccount.com"
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        endpoint.keys[email] = key.public_key()
        from tests.backends import GCSBackend

        bucket = GCSBackend(gcs).create_bucket()
        bucket.put("hello.txt", b"hi")
        url = urls.parse(bucket.storage()["url"])
        options = {"endpoint_url": gcs.endpoint}

        def check(sa):
            return trio.run(lambda: preflight.check("g", url, options, {"service_account.json": sa}, source_path="", writable=False, deadline=20))

        ok = check(_service_account(token_uri, key, email))
        assert ok.code == "ok", ok
        assert endpoint.exchanges >= 1  # the JWT was signed with the file's key and exchanged
        wrong = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        bad = check(_service_account(token_uri, wrong, email))
        assert bad.code == "credentials_invalid", bad
        assert endpoint.refused >= 1
    finally:
        endpoint.shutdown()
