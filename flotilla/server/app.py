"""The FastAPI app: routes by concern (each module adds its own), auth, errors, /health, /v1/models, /metrics.

The server is a thin translation layer. All validation of sampling parameters lives in the engine
(``SamplingParams`` raises ``InvalidParameter``, a ``ValueError`` that names its field); the route modules only
rename engine fields to the API's names (``max_new_tokens`` -> ``max_tokens``) so that a 400 names what the client
actually sent.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from flotilla.server.admin import add_admin_routes
from flotilla.server.auth import AuthMiddleware
from flotilla.server.chat import add_chat_route
from flotilla.server.completions import add_completion_route
from flotilla.server.engine_client import EngineClient
from flotilla.server.errors import CatchAllMiddleware, install_error_handlers
from flotilla.server.lora import adapter_card, adapters, add_lora_routes
from flotilla.server.metrics import render, safe_stats
from flotilla.server.rl_routes import add_rl_routes
from flotilla.server.state import ServerState
from flotilla.server.tokenization import add_tokenization_routes


def build_app(engine: EngineClient | None, model_name: str, api_key: str | None = None) -> FastAPI:
    """The HTTP app for ``engine`` (or for ``None`` while it loads: /health is 503 until ``set_engine``)."""
    app = FastAPI(title="Flotilla", summary="OpenAI-compatible LLM server", version="0.1.0", **_telemetry_kwargs())
    state = ServerState(engine, model_name, api_key)
    app.state.flotilla = state
    if api_key:
        app.add_middleware(AuthMiddleware, api_key=api_key)
    app.add_middleware(CatchAllMiddleware)  # added last: the outermost layer
    install_error_handlers(app)
    _add_open_routes(app, state)
    _add_model_routes(app, state)
    add_completion_route(app, state)
    add_chat_route(app, state)
    add_tokenization_routes(app, state)
    add_admin_routes(app, state)
    add_lora_routes(app, state)
    add_rl_routes(app, lambda: state.engine, api_key)  # type: ignore[arg-type,return-value]
    return app


def _telemetry_kwargs() -> dict[str, Any]:
    """FastAPI's native OpenTelemetry hooks off unless the environment configures OpenTelemetry (an
    ``OTEL_*`` variable). Left on, FastAPI asks OpenTelemetry for its providers on every request, which reads
    the environment several times: about 8% of the HTTP thread's time under 128 streams in a profile. Older
    FastAPI versions have no such option, and nothing to turn off."""
    import inspect
    import os

    if any(k.startswith("OTEL_") for k in os.environ):
        return {}
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def set_engine(app: FastAPI, engine: EngineClient) -> None:
    """Attach the engine once it is loaded (``serve`` starts listening first, so /health can say 503)."""
    app.state.flotilla.engine = engine


def _add_open_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        """200 while some replica is alive: "ok" when every one is, "degraded" while some are down (the
        others serve; the fleet restarts the rest); 503 while loading or when none can serve. A control
        operation under way (a weight-sync join, an update, a pause) is named under "control_op"; while the
        ranks are in it (they do not step) the status says "busy"."""
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        stats = safe_stats(state.engine)
        if stats is None:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        replicas = [{"id": r.get("id"), "alive": bool(r.get("alive"))} for r in stats.get("replicas", [])]
        serving = any(r["alive"] for r in replicas)
        ok = serving and all(r["alive"] for r in replicas)
        op = stats.get("control_op")
        status = ("busy" if op and op.get("on_ranks") else "ok") if ok else "degraded" if serving else "down"
        body: dict[str, Any] = {"status": status, "replicas": replicas}
        if op:
            body["control_op"] = op
        if stats.get("paused"):
            body["paused"] = True
        return JSONResponse(body, status_code=200 if serving else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        # on the loop, like /health: both are cheap, and they must answer even when every worker thread is busy
        # tokenizing (that is when an operator looks)
        body, content_type = render(state.metrics)
        return Response(body, media_type=content_type)


def _add_model_routes(app: FastAPI, state: ServerState) -> None:
    def card() -> dict[str, Any]:
        out: dict[str, Any] = {"id": state.model_name, "object": "model", "created": state.created,
                               "owned_by": "flotilla", "root": state.model_name, "parent": None}
        if state.engine is not None:
            out["max_model_len"] = state.engine.max_model_len
        return out

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The base model, then every loaded LoRA adapter (``parent``: the base model; ``root``: its folder)."""
        base = card()
        return {"object": "list", "data": [base] + [adapter_card(a, base) for a in adapters(state.engine)]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        lora = state.check_model(model)
        if lora is None:
            return card()
        found = [adapter_card(a, card()) for a in adapters(state.engine) if a["name"] == lora]
        if not found:  # unloaded a moment ago: now a 404
            state.check_model(model)
        return found[0]
