"""The ASGI middleware every request passes: API key, body cap, metrics, and the last word on errors.

- ``api_key``: requests to any path but the open ones (the page, health checks) need header ``X-API-Key``
  with it; without: 401 ``{"error": ...}``.
- ``max_body``: uvicorn reads bodies of any size, so the app caps them itself: a Content-Length over the cap
  is refused before the body is read, and a body sent without one (chunked) is counted as it streams
  and refused when it passes the cap (413), whatever the route was doing with it.
- An exception no route handled is logged here once, with its traceback, and answered with a 500 that
  holds no detail: nothing of the server's insides reaches the client.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any, Awaitable, Callable

from serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

OPEN_PATHS = frozenset({"/", "/health", "/ready", "/v2/health/live", "/v2/health/ready", "/favicon.ico"})


class _TooLarge(Exception):
    pass


async def send_json(send: Callable[[Message], Awaitable[None]], status: int, body: dict[str, Any],
                    headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class Guard:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it must see the body stream and the response start)."""

    def __init__(self, app: ASGIApp, *, metrics: ServeMetrics, max_body: int, api_key: str | None = None) -> None:
        self.app, self.metrics, self.max_body, self.api_key = app, metrics, max_body, api_key

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, state = time.perf_counter(), {"status": 500, "started": False, "over": False, "read": 0}

        async def tracked_send(message: Message) -> None:
            if state["over"]:
                return  # the route's answer to a body cut short; the 413 below replaces it
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        async def counted_receive() -> Message:
            message = await receive()
            state["read"] += len(message.get("body", b""))
            if state["read"] > self.max_body:
                state["over"] = True
                raise _TooLarge
            return message

        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                await send_json(tracked_send, *refusal)
            else:
                await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            pass
        except Exception:  # noqa: BLE001 - the one place unexpected errors are logged and answered
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if not state["started"]:
                await send_json(tracked_send, 500, {"error": "internal error; the server's log has the details"})
        if state["over"]:
            state["over"] = False
            log.warning("%s %s: body over the %d-byte limit: 413", scope.get("method"), scope.get("path"),
                        self.max_body)
            await send_json(tracked_send, 413, {"error": self._too_large()}, ((b"connection", b"close"),))
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        self.metrics.observe(route, scope.get("method", "?"), state["status"], time.perf_counter() - started)

    def _refuse(self, scope: Scope) -> tuple[int, dict[str, Any]] | None:
        """(status, body) of a request refused before the app sees it: no API key, a declared body over the cap."""
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"x-api-key", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), self.api_key.encode()):
                return 401, {"error": "missing or wrong API key: send it in the X-API-Key header"}
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return 413, {"error": self._too_large()}
        return None

    def _too_large(self) -> str:
        return f"request body over the limit of {self.max_body / 2**20:.0f} MB"
