"""The server's front door: what every request must satisfy before any route sees it.

One ASGI middleware, so the rules hold for every route (docs included) and live in one place:

* **API key** — when one is set, every route but ``/health`` and the static chat page at ``/``
  needs ``Authorization: Bearer KEY`` (compared in constant time). The chat page holds no data;
  its API calls carry the key the user types into it.
* **JSON only** — a POST must say ``Content-Type: application/json`` (415 otherwise). A browser
  sends a cross-origin ``text/plain`` POST without asking first (a "simple request"), so a server
  that parsed such bodies as JSON could be driven by any web page its user visits; a JSON POST from
  another origin needs a CORS preflight, which this server only grants to ``--allowed-origins``.
* **Body size** — bodies over ``max_body_bytes`` get 413, before they are read whole.
"""

from __future__ import annotations

import hmac
import json

from lmforge.serve.errors import error_body

OPEN_PATHS = frozenset({"/health", "/"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


def _error(status: int, message: str, type: str, code: str | None = None) -> tuple[int, bytes]:
    return status, json.dumps(error_body(message, type, None, code)).encode()


class RequestGuard:
    """ASGI middleware enforcing the API key, JSON request bodies and the body-size limit."""

    def __init__(self, app, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        problem = self._check(scope, headers)
        if problem is None and scope["method"] in BODY_METHODS:
            body, problem = await self._read_body(receive, headers)
            if problem is None:
                receive = _replay(body, receive)
        if problem is not None:
            status, payload = problem
            extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *extra]})  # fmt: skip
            await send({"type": "http.response.body", "body": payload})
            return
        await self.app(scope, receive, send)

    def _check(self, scope, headers: dict[str, str]) -> tuple[int, bytes] | None:
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
                return _error(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'.", "invalid_request_error", "invalid_api_key")  # fmt: skip
        if scope["method"] in BODY_METHODS:
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                given = f"'{media}'" if media else "no Content-Type"
                return _error(415, f"request bodies must be JSON: send 'Content-Type: application/json' (got {given}).", "invalid_request_error")  # fmt: skip
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                return self._too_large()
        return None

    def _too_large(self) -> tuple[int, bytes]:
        return _error(413, f"the request body is larger than this server's limit of {self.max_body_bytes:,} bytes (--max-body-bytes).",
                      "invalid_request_error")  # fmt: skip

    async def _read_body(self, receive, headers) -> tuple[bytes, tuple[int, bytes] | None]:
        """The whole body, or a 413 as soon as it passes the limit (a lying or absent Content-Length too)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", _error(400, "the client disconnected while sending the body.", "invalid_request_error")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive):
    """A ``receive`` that hands the app the body already read, then passes on what the client sends
    next (a disconnect, which cancels a streaming reply)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
