"""The bearer-key check, as plain ASGI so it runs before the body is parsed (a bad key is a 401 even when the
body is malformed) and without wrapping streaming responses."""

from __future__ import annotations

import hmac

from flotilla.server.errors import APIError, ASGIApp, Receive, Scope, Send

from flotilla.server.rl_routes import RL_PATHS

# every route that reaches the engine or changes it, the RL control routes (checked here, before their body is
# read) and the API docs (they list every admin and RL route); /health and /metrics stay open for probes and
# scrapers
PROTECTED_PREFIXES = ("/v1/", "/admin/", "/docs/")
PROTECTED_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info", "/docs", "/redoc", "/openapi.json") + RL_PATHS


def is_protected(path: str) -> bool:
    return (path + "/").startswith(PROTECTED_PREFIXES) or (path.rstrip("/") or "/") in PROTECTED_PATHS


class AuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_protected(scope.get("path", "")) and not self._authorized(scope):
            err = APIError(401, "Incorrect or missing API key; send the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
            response = err.response()
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False
