"""The first thing every HTTP request meets: the API key on /v1/*, /tokenize and /detokenize, and the request body
size limit.

A plain ASGI middleware rather than FastAPI dependencies, so that it answers before a body is read (401) or while
it is read (413), whatever the route, and never buffers more than the limit.
"""

from __future__ import annotations

import secrets
from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from megatron_bdlora.inference.errors import error_response

# Routes that need the key when one is set: the API, and vLLM's tokenizer routes (they run the tokenizer, so an open
# one would be free work for anyone; current vLLM guards every route but /health, /metrics, /version and the like).
GUARDED_PREFIXES = ("/v1", "/tokenize", "/detokenize")


class RequestGuard:
    """ASGI middleware: Bearer key on GUARDED_PREFIXES (when a key is set) and a body limit in bytes on every route.

    `on_reject(reason)` counts refusals for /metrics ("unauthorized", "body_too_large").
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int,
                 on_reject: Callable[[str], None]) -> None:
        self.app, self.api_key, self.max_body_bytes, self.on_reject = app, api_key, max_body_bytes, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith(GUARDED_PREFIXES) and not self._authorised(headers):
            self.on_reject("unauthorized")
            answer = error_response(401, "Incorrect or missing API key: send `Authorization: Bearer <key>` (the "
                                         "server's --api-key)", headers={"WWW-Authenticate": "Bearer"})
            await answer(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            self.on_reject("body_too_large")
            await error_response(413, self._too_large(f"{int(declared)} bytes"))(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _authorised(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())

    def _too_large(self, size: str) -> str:
        return f"the request body ({size}) is larger than the server's limit of {self.max_body_bytes} bytes"

    def _counting(self, receive: Receive) -> Callable[[], Awaitable[Any]]:
        """`receive` that raises a 413 once the body read so far passes the limit (a body without Content-Length)."""
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:  # counted by the app's error handler, which answers it
                    raise HTTPException(413, self._too_large(f"more than {self.max_body_bytes} bytes"))
            return message

        return counted
