"""Flotilla inside Ray's own libraries: batch inference with Ray Data (``ray_data``) and serving with Ray Serve
(``ray_serve``). Each module imports Ray lazily, so ``import flotilla.integrations`` costs nothing without Ray;
install ``flotilla[ray]`` (``ray[data,serve]``) to use them."""

__all__ = ["ray_data", "ray_serve"]
