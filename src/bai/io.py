"""Checkpoint I/O for streaming merges: safetensors headers, chunked reads, direct shard writes.

Reading: the safetensors header (8-byte little-endian length, then JSON ``{name: {dtype, shape,
data_offsets}}``) is parsed once per file; tensor bytes are then read on demand with ``os.preadv``
into a caller-owned buffer, so memory holds a few chunks, never a model, and no mapping of the
whole file inflates the resident set. Writing: the output shard's header is known before any
tensor is computed (names, shapes, dtype), so shards are written straight to disk in the
safetensors format, chunk by chunk, with no in-memory shard and no ``save_file`` copy.

Pickled ``.bin`` checkpoints are read through ``torch.load(mmap=True, weights_only=True)`` and
only when the recipe sets ``allow_pickle: true``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bai.config import MergeError

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
# non-weight files copied from the reference checkpoint next to the merged weights
AUX_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
             "chat_template.jinja", "chat_template.json", "preprocessor_config.json")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is."""

    file: Path
    """The weights file holding it."""
    dtype: torch.dtype
    """Stored dtype."""
    shape: tuple[int, ...]
    """Stored shape."""
    offset: int
    """Absolute byte offset of its data in ``file`` (-1 for tensors of a pickled checkpoint)."""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class Checkpoint:
    """A Hugging Face checkpoint directory, opened without reading any tensor data."""

    path: Path
    """The directory."""
    config: dict
    """Its ``config.json``."""
    tensors: dict[str, TensorInfo]
    """Tensor name -> location, in on-disk order (file, then offset)."""
    files: list[Path]
    """Its weight files."""
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)
    """Pickled checkpoints only: the memory-mapped tensors from ``torch.load``."""



def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header into ``TensorInfo`` per tensor (raises ``MergeError`` on a bad file)."""
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
            size = os.fstat(f.fileno()).st_size
            if n < 2 or 8 + n > size:
                raise MergeError(f"{file}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeError(f"{file}: cannot read safetensors header: {e}") from None
    header.pop("__metadata__", None)
    out = {}
    for name, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if h.get("dtype") not in ST_DTYPES:
            raise MergeError(f"{file}: tensor {name!r} has unsupported dtype {h.get('dtype')!r}")
        info = TensorInfo(file, ST_DTYPES[h["dtype"]], tuple(h["shape"]), 8 + n + h["data_offsets"][0])
        if h["data_offsets"][1] - h["data_offsets"][0] != info.nbytes or info.offset + info.nbytes > size:
            raise MergeError(f"{file}: tensor {name!r} has inconsistent offsets (truncated file?)")
        out[name] = info
    return out


def open_checkpoint(path: Path, *, allow_pickle: bool = False, key: str = "path") -> Checkpoint:
    """Open a checkpoint directory: config, weight files (index, single file or pickled), headers."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MergeError(f"{key}: {cfg_file} is missing (not a Hugging Face checkpoint directory)")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergeError(f"{cfg_file}: cannot read: {e}") from None
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise MergeError(f"{index}: cannot read the weight_map: {e}") from None
        files = sorted({path / f for f in weight_map.values()})
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        return _open_pickled(path, config, allow_pickle, key)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        if not f.is_file():
            raise MergeError(f"{index}: lists {f.name}, which does not exist")
        tensors.update(read_header(f))
    return Checkpoint(path=path, config=config, tensors=tensors, files=files)


def _open_pickled(path: Path, config: dict, allow_pickle: bool, key: str) -> Checkpoint:
    files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise MergeError(f"{key}: {path} has no model.safetensors, {INDEX_NAME} or pytorch_model*.bin weights")
    if not allow_pickle:
        raise MergeError(f"{key}: {path} has only pickled .bin weights ({files[0].name}); unpickling can run "
                         "arbitrary code: convert to safetensors, or set allow_pickle: true if you trust it")
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        if f.name.endswith(".index.json"):
            continue
        loaded.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
    tensors = {k: TensorInfo(path, v.dtype, tuple(v.shape), -1) for k, v in loaded.items()}
    return Checkpoint(path=path, config=config, tensors=tensors, files=files, loaded=loaded)


class Reader:
    """Reads element ranges of tensors into reusable byte buffers (one open fd per file)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def read(self, ckpt: Checkpoint, name: str, start: int, count: int, buf: torch.Tensor) -> torch.Tensor:
        """Elements ``[start, start + count)`` of tensor ``name`` (flattened), as a view of ``buf``
        (a uint8 tensor of at least ``count * itemsize`` bytes) in the stored dtype.
        """
        info = ckpt.tensors[name]
        nbytes = count * info.dtype.itemsize
        dst = buf[:nbytes]
        if info.offset < 0:
            dst.view(info.dtype).copy_(ckpt.loaded[name].reshape(-1)[start:start + count])
            return dst.view(info.dtype)
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        mv = memoryview(dst.numpy())
        pos, off = 0, info.offset + start * info.dtype.itemsize
        while pos < nbytes:
            got = os.preadv(fd, [mv[pos:]], off + pos)
            if got <= 0:
                raise MergeError(f"{info.file}: unexpected end of file while reading tensor {name!r}")
            pos += got
        return dst.view(info.dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ShardWriter:
    """Writes one safetensors file sequentially: the header first, then each tensor's bytes in order."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        pos = 0
        for name, dtype, shape in entries:
            n = dtype.itemsize
            for s in shape:
                n *= s
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % 8)          # data starts 8-byte aligned, as safetensors does
        self.path, self.expected, self.written = path, pos, 0
        self._f = open(path, "wb", buffering=0)
        self._f.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, t: torch.Tensor) -> None:
        """Append the bytes of a contiguous tensor (the next tensor, or the next chunk of it)."""
        mv = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        pos = 0
        while pos < len(mv):
            pos += self._f.write(mv[pos:])
        self.written += len(mv)

    def abort(self) -> None:
        """Close without the completeness check (the merge failed; the file is discarded)."""
        self._f.close()

    def close(self) -> None:
        self._f.close()
        if self.written != self.expected:
            raise RuntimeError(f"{self.path}: wrote {self.written} bytes, header promised {self.expected}")


def fingerprint(ckpt: Checkpoint, sample: int = 1 << 16) -> str:
    """A quick content fingerprint: sha256 of config.json, each weight file's name, size and header,
    and its first, middle and last ``sample`` bytes. Not a full hash (that would cost a full read).
    """
    h = hashlib.sha256((ckpt.path / "config.json").read_bytes())
    for f in ckpt.files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for off in (0, max(0, size // 2 - sample // 2), max(0, size - sample)):
                fh.seek(off)
                h.update(fh.read(sample))
    return "quick-sha256:" + h.hexdigest()


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer files, chat template and generation config from ``src`` to ``dst``."""
    copied = []
    for name in AUX_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
