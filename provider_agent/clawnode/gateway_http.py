"""The agent's HTTP calls to the gateway (enrolment), with the standard library only.

Errors come out as GatewayError with one clear line: the gateway's own "detail" for refusals,
"connection refused" / TLS verification failures / timeouts for transport problems. The
enrolment token is in the signed request body only: it is never part of a URL, a message or
an error.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import __version__, wire
from .keys import Identity, InvalidKey, parse_ed25519_public_key

__all__ = [
    "ENROLL_PATH",
    "EnrollResponse",
    "GatewayError",
    "build_enroll_envelope",
    "enroll",
    "seen_address",
]

ENROLL_PATH = "/api/v1/nodes/enroll/"
ADDRESS_PATH = "/api/v1/nodes/address/"
MAX_RESPONSE_BYTES = 1 << 20
USER_AGENT = f"clawnode/{__version__}"


class GatewayError(Exception):
    """A call to the gateway failed; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EnrollResponse:
    node_id: str
    name: str
    mesh_address: str
    gateway_public_key: str
    websocket_url: str
    mesh_network: str = ""  # when the gateway says which block the address belongs to
    job_network: str = ""  # when the gateway says which block job addresses come from
    region: str = ""  # the region the gateway recorded for the node ("" none, or it predates it)
    # The place of gateway_public_key in the gateway's chain of key certificates (clawnode.repin
    # follows rotations from there); 0 from a gateway that predates it: the key is then found in
    # the chain by searching, as before.
    gateway_key_sequence: int = 0


def build_enroll_envelope(
    identity: Identity,
    token: str,
    *,
    hostname: str,
    listen_port: int,
    endpoint: str,
    gpus: Sequence[wire.GpuInfo],
    now: int | None = None,
    region: str = "",
) -> dict[str, Any]:
    """The signed ENROLL envelope (proof that we hold the identity key). `region` is sent only
    when declared: a gateway that predates the field refuses unknown fields."""
    body = wire.EnrollRequest(
        token=token,
        identity_public_key=identity.public_key_b64,
        wireguard_public_key=identity.wireguard_public_key_b64,
        hostname=hostname,
        listen_port=listen_port,
        endpoint=endpoint,
        gpus=tuple(gpus),
        timestamp=int(time.time()) if now is None else now,
        nonce=wire.new_nonce(),
        region=region,
    ).to_dict()
    if not region:
        del body["region"]
    return wire.signed_envelope(wire.ENROLL, body, identity)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would follow a redirect of a POST as a GET without the body, and the error would be
    # a confusing 405 from somewhere else. Say what happened instead.
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        raise GatewayError(
            f"the gateway redirected {req.full_url} to {newurl} (HTTP {code}); "
            "use that address as --gateway",
            code,
        )


def _detail(body: bytes) -> str:
    """The gateway's reason from an error body: DRF's "detail", else field errors, else text."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        text = body.decode("utf-8", "replace").strip()
        return " ".join(text.split())[:200]
    if isinstance(data, dict):
        detail = data.get("detail")
        if isinstance(detail, str):
            return detail
        parts = []
        for field, errors in data.items():
            if isinstance(errors, list):
                errors = "; ".join(str(e) for e in errors)
            parts.append(f"{field}: {errors}")
        return ", ".join(parts)[:300]
    return str(data)[:200]


def _post_json(
    url: str, payload: dict[str, Any] | None, timeout: float, what: str
) -> dict[str, Any]:
    """POST `payload` as JSON (or GET, with None) and return the JSON object answered."""
    headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
    if payload is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(  # noqa: S310 (the scheme is checked: http or https)
        url,
        data=None if payload is None else json.dumps(payload).encode("utf-8"),
        method="GET" if payload is None else "POST",
        headers=headers,
    )
    opener = urllib.request.build_opener(_NoRedirect())
    base = f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        detail = _detail(exc.read(MAX_RESPONSE_BYTES))
        if exc.code == 404 and not detail.strip(" ."):
            detail = "no such endpoint"
        reason = f": {detail}" if detail else ""
        verdict = "failed while handling" if exc.code >= 500 else "refused"
        raise GatewayError(
            f"gateway {verdict} the {what} (HTTP {exc.code}){reason}", exc.code
        ) from None
    except urllib.error.URLError as exc:
        raise GatewayError(_transport_error(base, exc.reason)) from None
    except TimeoutError:
        raise GatewayError(f"gateway {base} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise GatewayError(_transport_error(base, exc)) from None
    if len(body) > MAX_RESPONSE_BYTES:
        raise GatewayError(f"gateway {base} sent a response larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise GatewayError(
            f"gateway {base} did not answer with JSON (is it a MOLT gateway?)"
        ) from None
    if not isinstance(parsed, dict):
        raise GatewayError(f"gateway {base} answered with JSON that is not an object")
    return parsed


def _transport_error(base: str, reason: object) -> str:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS certificate of {base} could not be verified: {reason.verify_message}"
    if isinstance(reason, ssl.SSLError):
        return f"TLS connection to {base} failed: {reason.reason or reason}"
    if isinstance(reason, ConnectionRefusedError):
        return f"cannot reach gateway {base}: connection refused (is it running on that port?)"
    if isinstance(reason, socket.gaierror):
        return f"cannot reach gateway {base}: host name not found ({reason.strerror})"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"gateway {base} did not answer in time"
    if isinstance(reason, OSError) and reason.strerror:
        return f"cannot reach gateway {base}: {reason.strerror}"
    return f"cannot reach gateway {base}: {reason}"


def _str_field(data: dict[str, Any], *names: str) -> str:
    for name in names:
        value = data.get(name)
        if isinstance(value, str) and value:
            return value
    raise GatewayError(f"gateway's enrolment answer has no {names[0]!r}")


def _parse_response(data: dict[str, Any], gateway: str, identity: Identity) -> EnrollResponse:
    node_id = _str_field(data, "node_id")
    if node_id != identity.node_id:
        # The gateway derives the node id from our key; a different one means it enrolled
        # something else (or is not the gateway we think). Do not record it as ours.
        raise GatewayError(
            f"gateway answered for node {node_id}, but this machine is {identity.node_id}"
        )
    gateway_key = _str_field(data, "gateway_public_key")
    try:
        parse_ed25519_public_key(gateway_key)
    except InvalidKey as exc:
        raise GatewayError(f"gateway sent an invalid public key: {exc}") from None
    websocket_url = data.get("websocket_url")
    if not isinstance(websocket_url, str) or not websocket_url:
        parts = urlsplit(gateway)
        scheme = "wss" if parts.scheme == "https" else "ws"
        websocket_url = f"{scheme}://{parts.netloc}/ws/agent/"
    elif gateway.startswith("https://") and not websocket_url.startswith("wss://"):
        raise GatewayError(
            f"the gateway's answer downgrades the agent channel to {websocket_url.split(':')[0]}"
            ":// after an https:// join; refusing (a proxy rewriting it, or not the gateway?)"
        )
    mesh_network = data.get("mesh_network")
    job_network = data.get("job_network")
    sequence = data.get("gateway_key_sequence", 0)
    if isinstance(sequence, bool) or not isinstance(sequence, int) or not 0 <= sequence < 2**53:
        raise GatewayError(
            "gateway's enrolment answer has an invalid gateway_key_sequence: "
            "it must be a whole number from 0"
        )
    return EnrollResponse(
        node_id=node_id,
        name=_str_field(data, "name", "node_name"),
        mesh_address=_str_field(data, "mesh_address"),
        gateway_public_key=gateway_key,
        websocket_url=websocket_url,
        mesh_network=mesh_network if isinstance(mesh_network, str) else "",
        job_network=job_network if isinstance(job_network, str) else "",
        region=region if isinstance(region := data.get("region"), str) else "",
        gateway_key_sequence=sequence,
    )


def seen_address(gateway: str, *, timeout: float = 10.0) -> str | None:
    """The address the gateway sees this machine at (GET nodes/address/), or None when it
    cannot say: a gateway that predates the call, or anything else that fails. Nothing depends
    on it but the choice of a default endpoint (cli.cmd_join), so a failure is not an error."""
    try:
        data = _post_json(gateway + ADDRESS_PATH, None, timeout, "address lookup")
    except GatewayError:
        return None
    address = data.get("address")
    if not isinstance(address, str):
        return None
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


def enroll(
    gateway: str, envelope: dict[str, Any], identity: Identity, *, timeout: float = 30.0
) -> EnrollResponse:
    """POST the signed enrolment to ``gateway`` (a normalized base URL); the node it got."""
    data = _post_json(gateway + ENROLL_PATH, envelope, timeout, "enrolment")
    return _parse_response(data, gateway, identity)
