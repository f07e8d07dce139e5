"""Flotilla: an LLM inference engine that scales out on Ray."""

from flotilla.sampling import SamplingParams

__all__ = ["Engine", "RayEngine", "RequestFailed", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that worker processes and Ray actors do not import the front end (and Ray stays optional).
    if name == "Engine":
        from flotilla.frontend.engine import Engine

        return Engine
    if name == "RayEngine":
        from flotilla.frontend.ray_engine import RayEngine

        return RayEngine
    if name == "RequestFailed":
        from flotilla.frontend.request import RequestFailed

        return RequestFailed
    raise AttributeError(name)
