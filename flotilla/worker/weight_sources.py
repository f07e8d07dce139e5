"""Where the tensors of a weight update come from, as one rank sees them.

A source is a string, so it fits in a msgspec message:

* a path: a ``*.safetensors`` file or a checkpoint folder every rank of the replica can read (memory-mapped,
  each rank narrows every tensor to its own shard);
* ``staged:<key>``: (name, tensor) pairs that something in this process handed over beforehand with
  :func:`stage`. A launcher uses this when the tensors do not live in a file, e.g. the Ray launcher's rank
  actor fetches object refs in a side thread and stages what it got. Nothing here knows who staged them.

Staged tensors are taken (and forgotten) by the update that reads them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

STAGED = "staged:"

_lock = threading.Lock()
_staged: dict[str, list[tuple[str, torch.Tensor]]] = {}


def stage(key: str, items: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Keep ``items`` in this process until an update with source ``staged:<key>`` reads them."""
    items = list(items)
    with _lock:
        _staged[key] = items


def unstage(key: str) -> bool:
    """Drop staged tensors nobody read (an update that was refused or timed out)."""
    with _lock:
        return _staged.pop(key, None) is not None


def staged_keys() -> list[str]:
    with _lock:
        return sorted(_staged)


def open_source(source: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a source, one at a time (a file is read lazily, tensor by tensor)."""
    if source.startswith(STAGED):
        key = source[len(STAGED):]
        with _lock:
            items = _staged.pop(key, None)
        if items is None:
            raise ValueError(f"weights: nothing was staged in this process under {key!r}")
        yield from items
        return
    path = Path(source)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)
    elif path.is_dir():
        from flotilla.model.loader import iter_safetensors

        yield from iter_safetensors(path)
    else:
        raise ValueError(f"weights: source {source!r} is neither a file nor a folder on this node")
