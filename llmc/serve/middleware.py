"""Pure ASGI middleware (no ``BaseHTTPMiddleware``: it buffers streamed responses and hides disconnects).

``BodyLimit`` reads the whole body before the app sees it, so a body over the limit gets 413 whether it
declared its size or streamed it chunked; the app then reads the buffered copy, and later ``receive``
calls go to the server, so disconnects still arrive. ``ApiKey`` checks ``Authorization: Bearer``.
"""
from __future__ import annotations

import secrets

from fastapi.responses import JSONResponse

OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def error_json(status: int, message: str, type_: str, param: str | None = None, code=None,
               headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status,
                        headers=headers)


class BodyLimit:
    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.limit:
                return await self._too_big(scope, receive, send)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        buffered = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return buffered.pop() if buffered else await receive()

        await self.app(scope, replay, send)

    async def _too_big(self, scope, receive, send):
        resp = error_json(413, f"request body exceeds {self.limit} bytes", "invalid_request_error",
                          code="request_too_large")
        await resp(scope, receive, send)


class ApiKey:
    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(got, self.expected):
                resp = error_json(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                  "invalid_request_error", code="invalid_api_key")
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)
