#!/usr/bin/env python3
"""A small receiver of shoal webhooks, Python standard library only (docs/webhooks.md).

It verifies each request's Standard Webhooks signature, refuses timestamps more than five
minutes away from its clock, and applies each webhook-id's effect once: a retry, or the same
delivery sent again by another shoal replica after a failover, is answered 200 and not
applied again.

    WEBHOOK_SECRET=whsec_... python3 examples/webhook-receiver.py --port 8080
    python3 examples/webhook-receiver.py --self-test

It prints one line per request: `effect <id> <body>`, `duplicate <id>` or
`rejected <id>: <why>`.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE_SECONDS = 5 * 60


def verify(secret, headers, body, now=None):
    """None if the request is authentic and fresh, else why not."""
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        return "missing webhook-id, webhook-timestamp or webhook-signature"
    try:
        sent_at = int(timestamp)
    except ValueError:
        return "webhook-timestamp is not a number"
    now = time.time() if now is None else now
    if abs(now - sent_at) > TOLERANCE_SECONDS:
        return "webhook-timestamp is more than 5 minutes away (a replay?)"
    key = base64.b64decode(secret.strip().removeprefix("whsec_"))
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    # The header is a space-separated list of `version,signature` (several while keys rotate).
    for candidate in signatures.split(" "):
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return None
    return "no valid v1 signature"


class Effects:
    """Applies each webhook-id once. A real receiver records the id in the same database
    transaction as the effect, and keeps it longer than shoal's retries last."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen = set()

    def apply_once(self, msg_id, event):
        with self.lock:
            if msg_id in self.seen:
                return False
            self.seen.add(msg_id)
            say(f"effect {msg_id} {json.dumps(event, sort_keys=True)}")
            return True


def say(line):
    print(line, flush=True)


def handler(secret, effects):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            msg_id = self.headers.get("webhook-id", "")
            problem = verify(secret, self.headers, body)
            if problem:
                say(f"rejected {msg_id}: {problem}")
                return self.answer(401)  # shoal retries, then gives up
            if not effects.apply_once(msg_id, json.loads(body)):
                say(f"duplicate {msg_id}")
            self.answer(200)  # 2xx for a duplicate too: the effect is there

        def answer(self, status):
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    return Handler


def self_test():
    """The Standard Webhooks test vector, checked offline."""
    secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
    body = b'{"email":"test@example.com","username":"test_user"}'
    headers = {
        "webhook-id": "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
        "webhook-timestamp": "1649367553",
        "webhook-signature": "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
    }
    assert verify(secret, headers, body, now=1649367553) is None
    assert verify(secret, headers, body + b" ", now=1649367553) is not None
    assert verify(secret, headers, body, now=1649367553 + 301) is not None
    say("self-test passed")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    if args.self_test:
        return self_test()
    secret = os.environ.get("WEBHOOK_SECRET")
    if not secret:
        sys.exit("set WEBHOOK_SECRET to the whsec_... secret shoal signs with")
    server = ThreadingHTTPServer((args.host, args.port), handler(secret, Effects()))
    say(f"listening on http://{args.host}:{server.server_address[1]}")
    server.serve_forever()


if __name__ == "__main__":
    main()
