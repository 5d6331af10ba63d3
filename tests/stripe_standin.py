"""A local stand-in for the few parts of Stripe the gateway uses (no network reaches Stripe
here): the Checkout Sessions API, Stripe's hosted checkout page, and webhook delivery.

- POST /v1/checkout/sessions, GET /v1/checkout/sessions/<id> and
  POST /v1/checkout/sessions/<id>/expire answer as Stripe documents them
  (https://docs.stripe.com/api/checkout/sessions/object): form-encoded requests with a Bearer
  secret key, JSON Checkout Session objects, Stripe's error shape, and Idempotency-Key replay.
- GET /c/pay/<id> is the "hosted checkout page": the amount, a "Pay" button and a cancel link.
  Pressing Pay marks the session complete and paid, sends the browser to the session's
  success_url, and delivers a `checkout.session.completed` event to the webhook URL, signed
  with the webhook secret by the `stripe` library's own scheme
  (stripe.WebhookSignature.generate_signature_header: `t=<unix time>,v1=<HMAC-SHA256 hex>`).
  Delivery happens `deliver_delay` seconds after the redirect, as with Stripe, where the
  buyer often returns before the webhook arrives.

Tests also build and deliver events themselves (event(), deliver()): replays, forgeries
(another secret), stale timestamps and out-of-order deliveries.
"""

from __future__ import annotations

import html
import json
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import stripe

API_VERSION = "2025-01-27.acacia"


def _nested(form: dict[str, str]) -> dict[str, Any]:
    """Stripe's form encoding (`line_items[0][price_data][currency]=usd`) back to a tree; list
    indexes stay string keys ("0")."""
    tree: dict[str, Any] = {}
    for key, value in form.items():
        parts = key.replace("]", "").split("[")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


class StripeStandIn:
    def __init__(
        self,
        *,
        api_key: str = "sk_test_standin",
        webhook_secret: str = "whsec_standin",  # noqa: S107  (a test secret)
        webhook_url: str | None = None,
        deliver_delay: float = 0.0,
    ) -> None:
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.webhook_url = webhook_url
        self.deliver_delay = deliver_delay
        self.sessions: dict[str, dict[str, Any]] = {}
        self.idempotent: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every API call
        # The form of every session create, nested (line_items' indexes stay string keys).
        self.created: list[dict[str, Any]] = []
        self.failures = 0  # answer the next this many session creates with a 500
        self.deliveries: list[tuple[str, str, int]] = []  # (event id, type, HTTP status)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StripeStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- the objects --------------------------------------------------------------------------

    def create_session(self, params: dict[str, Any]) -> dict[str, Any]:
        item = params["line_items"]["0"]
        price = item["price_data"]
        amount = int(price["unit_amount"]) * int(item.get("quantity", "1"))
        now = int(time.time())
        session_id = "cs_test_" + secrets.token_urlsafe(48).replace("-", "a").replace("_", "b")
        session = {
            "id": session_id,
            "object": "checkout.session",
            "after_expiration": None,
            "allow_promotion_codes": None,
            "amount_subtotal": amount,
            "amount_total": amount,
            "automatic_tax": {"enabled": False, "liability": None, "status": None},
            "billing_address_collection": None,
            "cancel_url": params.get("cancel_url"),
            "client_reference_id": params.get("client_reference_id"),
            "consent": None,
            "created": now,
            "currency": price["currency"],
            "customer": None,
            "customer_creation": "if_required",
            "customer_details": None,
            "customer_email": None,
            "expires_at": now + 24 * 3600,
            "invoice": None,
            "livemode": False,
            "locale": None,
            "metadata": params.get("metadata", {}),
            "mode": params["mode"],
            "payment_intent": None,
            "payment_link": None,
            "payment_method_collection": "if_required",
            "payment_method_types": ["card"],
            "payment_status": "unpaid",
            "status": "open",
            "submit_type": None,
            "subscription": None,
            "success_url": params["success_url"],
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": "hosted",
            "url": f"{self.base_url}/c/pay/{session_id}",
        }
        self.sessions[session_id] = session
        return session

    def pay(self, session_id: str) -> dict[str, Any]:
        """The buyer paid: the session is complete and paid; returns its completed event."""
        session = self.sessions[session_id]
        session.update(
            status="complete",
            payment_status="paid",
            url=None,
            payment_intent="pi_" + secrets.token_hex(12),
            customer_details={"email": "buyer@example.com", "name": "Test Buyer"},
        )
        return self.event(session, "checkout.session.completed")

    def event(self, session: dict[str, Any], event_type: str) -> dict[str, Any]:
        return {
            "id": "evt_" + secrets.token_hex(12),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()),
            "data": {"object": dict(session)},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }

    def sign(self, payload: str, *, secret: str | None = None, timestamp: int | None = None) -> str:
        return stripe.WebhookSignature.generate_signature_header(
            payload, secret or self.webhook_secret, timestamp=timestamp
        )

    def deliver(
        self,
        event: dict[str, Any],
        *,
        secret: str | None = None,
        timestamp: int | None = None,
        url: str | None = None,
    ) -> int:
        """POST `event` to the webhook as Stripe does; returns the HTTP status."""
        payload = json.dumps(event, indent=2)
        request = urllib.request.Request(
            url or self.webhook_url or "",
            data=payload.encode(),
            method="POST",
            headers={
                "Content-Type": "application/json; charset=utf-8",
                "Stripe-Signature": self.sign(payload, secret=secret, timestamp=timestamp),
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        with self.lock:
            self.deliveries.append((event["id"], event["type"], status))
        return status

    # --- HTTP ---------------------------------------------------------------------------------

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", "req_" + secrets.token_hex(8))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str, param: str | None = None) -> None:
                error = {"type": "invalid_request_error", "message": message}
                if param:
                    error["param"] = param
                self._json(status, {"error": error})

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {standin.api_key}":
                    return True
                self._error(401, "Invalid API Key provided.")
                return False

            def _form(self) -> dict[str, str]:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                return dict(urllib.parse.parse_qsl(body, keep_blank_values=True))

            def _session(self, session_id: str) -> dict[str, Any] | None:
                session = standin.sessions.get(session_id)
                if session is None:
                    self._error(404, f"No such checkout.session: '{session_id}'", "session")
                return session

            def do_GET(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                if path.startswith("/v1/checkout/sessions/"):
                    standin.requests.append(("GET", path))
                    if self._authorised() and (session := self._session(path.split("/")[-1])):
                        self._json(200, session)
                elif path.startswith("/c/pay/"):
                    session = standin.sessions.get(path.split("/")[-1])
                    if session is None:
                        self.send_error(404)
                        return
                    self._page(session)
                else:
                    self.send_error(404)

            def _page(self, session: dict[str, Any]) -> None:
                amount = f"${session['amount_total'] / 100:,.2f}"
                action = f"/c/pay/{session['id']}"
                body = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Pay {amount} - Stripe Checkout (stand-in)</title></head>
<body style="font-family:sans-serif;max-width:30rem;margin:3rem auto">
<p>Test mode: local Stripe stand-in</p>
<h1 id="checkout-amount">Pay {amount}</h1>
<p>MOLT wallet credit, {html.escape(session["currency"].upper())}</p>
<form method="post" action="{action}">
<label>Card number <input name="card" value="4242 4242 4242 4242" id="card-number"></label>
<button type="submit" id="submit-payment">Pay {amount}</button>
</form>
<p><a href="{html.escape(session["cancel_url"] or "/")}" id="cancel-checkout">Back</a></p>
</body></html>""".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                if path == "/v1/checkout/sessions":
                    standin.requests.append(("POST", path))
                    if not self._authorised():
                        return
                    if standin.failures:
                        standin.failures -= 1
                        self._error(500, "An unknown error occurred.")
                        return
                    key = self.headers.get("Idempotency-Key")
                    params = _nested(self._form())
                    with standin.lock:
                        standin.created.append(params)
                        if key and key in standin.idempotent:
                            self._json(200, standin.sessions[standin.idempotent[key]])
                            return
                        for required in ("mode", "success_url", "line_items"):
                            if required not in params:
                                self._error(400, f"Missing required param: {required}.", required)
                                return
                        try:
                            session = standin.create_session(params)
                        except (KeyError, ValueError):
                            self._error(400, "Invalid line_items.", "line_items")
                            return
                        if key:
                            standin.idempotent[key] = session["id"]
                    self._json(200, session)
                elif path.startswith("/v1/checkout/sessions/") and path.endswith("/expire"):
                    standin.requests.append(("POST", path))
                    if self._authorised() and (session := self._session(path.split("/")[-2])):
                        if session["status"] != "open":
                            self._error(400, "Only open Checkout Sessions can be expired.")
                            return
                        session.update(status="expired", url=None)
                        self._json(200, session)
                elif path.startswith("/c/pay/"):
                    session = standin.sessions.get(path.split("/")[-1])
                    if session is None or session["status"] != "open":
                        self.send_error(404)
                        return
                    event = standin.pay(session["id"])
                    self.send_response(303)
                    target = session["success_url"].replace("{CHECKOUT_SESSION_ID}", session["id"])
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

                    def later() -> None:
                        time.sleep(standin.deliver_delay)
                        standin.deliver(event)

                    threading.Thread(target=later, daemon=True).start()
                else:
                    self.send_error(404)

        return Handler


# --- for tests ----------------------------------------------------------------------------------


def signed_post(client, standin: StripeStandIn, event: dict[str, Any], **sign):
    """Deliver `event` through Django's test client, signed as Stripe signs it."""
    payload = json.dumps(event)
    return client.post(
        "/stripe/webhook/",
        data=payload,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=standin.sign(payload, **sign),
    )
