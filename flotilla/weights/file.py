"""File transport: a safetensors file or checkpoint folder every rank can read.

Two front-end forms: the caller's path (``update_weights_from_disk``: headers are read and checked), or
tensors of the caller's process written into one safetensors file in the engine's private 0700 folder
(``update_weights`` with every rank on this node). Ranks memory-map the file and read tensor by tensor.
Either can be replayed by a replica started later (while the file stays in place).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from flotilla.ipc.messages import FileSource
from flotilla.weights.check import meta_tensor
from flotilla.weights.transport import RankContext, WeightTransport

ENGINE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
UPDATE_FILE_GLOB = "weights-v*.safetensors*"


def checkpoint_files(path: Any) -> tuple[Path, list[Path]]:
    """(resolved path, its safetensors files) of a file or folder, or a ``ValueError`` naming ``path``."""
    from flotilla.model.loader import safetensors_files

    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"path: must be a file or folder path, got {path!r}")
    p = Path(path).resolve()
    if p.is_file():
        return p, [p]
    if p.is_dir():
        try:
            return p, safetensors_files(p)
        except ValueError as e:
            raise ValueError(f"path: {e.args[0].removeprefix('model: ')}") from None
    raise ValueError(f"path: {str(path)!r} is neither a file nor a folder")


def read_headers(files: list[Path]) -> list[tuple[str, torch.Tensor]]:
    """(name, meta tensor) of every tensor in ``files``, from their headers only."""
    from safetensors import safe_open

    items = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    items.append((name, meta_tensor(name, sl.get_shape(), sl.get_dtype())))
        except ValueError:
            raise
        except Exception as e:  # safetensors' own error for a file that is not one (a .bin, a text file)
            raise ValueError(f"path: {str(f)!r} is not a readable safetensors file ({type(e).__name__}: {e}); "
                             "weights load from safetensors only") from None
    return items


class FileTransport(WeightTransport):
    name = "file"
    source_type = FileSource

    def __init__(self, path: str | None = None, *, tensors: list[tuple[str, Any]] | None = None,
                 private_dir: str | None = None, dtype: str = "float32"):
        self.path, self.tensors, self.private_dir, self.dtype = path, tensors, private_dir, dtype
        self.replay = path
        self._files: list[Path] = []  # the checkpoint's safetensors files (from_path)

    @classmethod
    def from_path(cls, path: Any) -> FileTransport:
        p, files = checkpoint_files(path)
        t = cls(str(p))
        t._files = files
        return t

    @classmethod
    def from_tensors(cls, items: list[tuple[str, Any]], private_dir: str, dtype: str) -> FileTransport:
        return cls(tensors=items, private_dir=private_dir, dtype=dtype)

    def describe(self, timeout: float) -> list[tuple[str, Any]]:
        if self.tensors is not None:
            return self.tensors
        return read_headers(self._files)

    def prepare(self, version: int) -> None:
        if self.tensors is not None:
            self.path = self.replay = write_update_file(self.tensors, self.private_dir, version, self.dtype)

    def source_for(self, replica: int) -> FileSource:
        assert self.path is not None, "prepare() writes the file first"
        return FileSource(self.path)

    @staticmethod
    def receive(source: FileSource, ctx: RankContext) -> Iterator[tuple[str, torch.Tensor]]:
        return read_file_source(source.path)


def read_file_source(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a file or folder, read lazily, tensor by tensor."""
    p = Path(path)
    if p.is_file():
        from safetensors import safe_open

        with safe_open(str(p), framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)
    elif p.is_dir():
        from flotilla.model.loader import iter_safetensors

        yield from iter_safetensors(p)
    else:
        raise ValueError(f"weights: source {path!r} is neither a file nor a folder on this node")


def write_update_file(items: list[tuple[str, Any]], private_dir: str, version: int, dtype: str) -> str:
    """One safetensors file in the private folder, in the engine's dtype, that every rank memory-maps."""
    from safetensors.torch import save_file

    to = ENGINE_DTYPES.get(dtype, torch.float32)
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in items:
        t = tensor.detach().to(dtype=to).to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel():  # safetensors refuses tensors that share memory
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    path = os.path.join(private_dir, f"weights-v{version}-{uuid.uuid4().hex[:8]}.safetensors")
    save_file(out, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def prune_update_files(private_dir: str, keep: set[str]) -> None:
    """Remove the update files in ``private_dir`` that are not in ``keep`` (what a later replica replays)."""
    for f in Path(private_dir).glob(UPDATE_FILE_GLOB):
        if str(f) not in keep:
            try:
                f.unlink()
            except OSError:
                pass
