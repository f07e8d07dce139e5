"""``POST /admin/scale``: grow or shrink the data-parallel replicas while serving (behind the API key)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from flotilla.server.errors import from_value_error, unavailable
from flotilla.server.protocol import ScaleRequest
from flotilla.server.state import ServerState
from flotilla.server.tokens import off_loop


def add_admin_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/admin/scale")
    async def scale(body: ScaleRequest) -> dict[str, Any]:
        """Blocks until the new replicas are ready or the old ones drained, in a worker thread."""
        engine = state.ready_engine()
        try:
            await off_loop(engine.scale, body.dp_size, body.drain_timeout_s)
        except ValueError as e:
            raise from_value_error(e, {}) from None
        except (RuntimeError, TimeoutError) as e:
            raise unavailable(f"scaling failed: {e}") from None
        stats = await off_loop(engine.stats)
        return {"dp_size": stats.get("dp_size"),
                "replicas": [{"id": r["id"], "alive": r["alive"]} for r in stats["replicas"]]}
