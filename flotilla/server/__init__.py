"""Flotilla's OpenAI-compatible HTTP server. ``build_app`` / ``ServerThread`` for embedding; ``serve`` for the CLI.

Modules, one concern each: ``protocol`` (request bodies), ``errors`` (OpenAI-shaped errors), ``engine_client``
(what the server uses of an engine), ``runs`` and ``streaming`` (engine requests, SSE), ``completions``, ``chat``,
``tokenization`` (/tokenize, /detokenize), ``admin``, ``metrics``, ``auth``, ``app`` and ``launch``.
"""

from flotilla.server.app import build_app, set_engine
from flotilla.server.launch import ServerThread, bind_socket, serve

__all__ = ["ServerThread", "bind_socket", "build_app", "serve", "set_engine"]
