"""Checkpoint I/O for streaming merges: safetensors headers, chunked reads, direct shard writes.

Reading: the safetensors header (8-byte little-endian length, then JSON ``{name: {dtype, shape,
data_offsets}}``) is parsed once per file; tensor bytes are then viewed on demand in a private
memory map of the file (``Reader``), whose pages are mapped just ahead of use and unmapped after,
so memory holds a few chunks, never a model. Writing: the output shard's header is known before any
tensor is computed (names, shapes, dtype), so shards are written straight to disk in the
safetensors format, chunk by chunk, with no in-memory shard and no ``save_file`` copy.

Pickled ``.bin`` checkpoints are read through ``torch.load(mmap=True, weights_only=True)`` and
only when the recipe sets ``allow_pickle: true``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
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



def _bad(file: Path, msg: str) -> MergeError:
    return MergeError(f"{file}: not a valid safetensors file: {msg}")


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header into ``TensorInfo`` per tensor.

    Raises ``MergeError`` naming the file (and the tensor) on: a file shorter than its header
    length says (truncated), a header that is not a JSON object, an entry without a known
    ``dtype``, a ``shape`` of non-negative ints and ``data_offsets`` [begin, end], offsets that do
    not match the shape or overlap, or data that runs past the end of the file.
    """
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise _bad(file, f"only {size} bytes, shorter than the 8-byte header length (truncated?)")
            (n,) = struct.unpack("<Q", raw)
            if n < 2 or 8 + n > size:
                raise _bad(file, f"header length {n} runs past the end of the {size}-byte file (truncated?)")
            blob = f.read(n)
    except OSError as e:
        raise MergeError(f"{file}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(file, f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(file, f"the header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    out = {}
    for name, h in header.items():
        where = f"tensor {name!r}"
        if not isinstance(h, dict):
            raise _bad(file, f"{where}: entry is not an object")
        dtype, shape, offs = h.get("dtype"), h.get("shape"), h.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise _bad(file, f"{where}: unknown dtype {dtype!r} (known: {', '.join(ST_DTYPES)})")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise _bad(file, f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise _bad(file, f"{where}: data_offsets {offs!r} is not [begin, end] with 0 <= begin <= end")
        info = TensorInfo(file, ST_DTYPES[dtype], tuple(shape), 8 + n + offs[0])
        if offs[1] - offs[0] != info.nbytes:
            raise _bad(file, f"{where}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, but shape "
                             f"{shape} of {dtype} needs {info.nbytes}")
        if offs[1] > data_size:
            raise _bad(file, f"{where}: data ends at byte {offs[1]} of a {data_size}-byte data section "
                             "(truncated file?)")
        out[name] = info
    spans = sorted((i.offset, i.offset + i.nbytes, k) for k, i in out.items())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise _bad(file, f"tensors {a!r} and {b!r} overlap in the data section")
    return {k: out[k] for _, _, k in spans}


def _read_json_object(file: Path, what: str) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise MergeError(f"{file}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeError(f"{file}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MergeError(f"{file}: {what} must be a JSON object, got a JSON {type(data).__name__}")
    return data


def _weight_map(index: Path) -> dict[str, str]:
    """The checked ``weight_map`` of a sharded checkpoint: tensor name -> shard file in the same directory."""
    data = _read_json_object(index, "the shard index")
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise MergeError(f"{index}: weight_map must be a non-empty mapping of tensor name -> shard file, "
                         f"got {type(wm).__name__ if wm is not None else 'nothing'}")
    for name, shard in wm.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise MergeError(f"{index}: weight_map[{name!r}] = {shard!r} is not a shard file name in "
                             "the checkpoint directory")
    return wm


def open_checkpoint(path: Path, *, allow_pickle: bool = False, key: str = "path") -> Checkpoint:
    """Open a checkpoint directory: config, weight files (index, single file or pickled), headers.

    Every file is checked here, before a merge reads any tensor: ``config.json`` must be a JSON
    object, an index must map tensor names to shard files that exist and hold those tensors,
    and every safetensors header must be consistent with its file (``read_header``).
    """
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MergeError(f"{key}: {cfg_file} is missing (not a Hugging Face checkpoint directory)")
    config = _read_json_object(cfg_file, "config.json")
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = _weight_map(index)
        files = sorted({path / f for f in weight_map.values()})
    elif (path / "model.safetensors").is_file():
        weight_map, files = None, [path / "model.safetensors"]
    else:
        return _open_pickled(path, config, allow_pickle, key)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        if not f.is_file():
            raise MergeError(f"{index}: lists {f.name}, which does not exist")
        tensors.update(read_header(f))
    if not tensors:
        raise MergeError(f"{key}: {path} holds no tensors (its weight files are empty)")
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in tensors or tensors[name].file.name != shard:
                raise MergeError(f"{index}: lists tensor {name!r} in {shard}, but {shard} does not hold it")
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
        try:
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch.load raises many kinds on a corrupt file
            msg = " ".join(str(e).split())[:200] or type(e).__name__
            raise MergeError(f"{f}: cannot load pickled weights ({type(e).__name__}: {msg})") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise MergeError(f"{f}: expected a state dict of tensor name -> tensor, got {type(sd).__name__}")
        loaded.update(sd)
    tensors = {k: TensorInfo(path, v.dtype, tuple(v.shape), -1) for k, v in loaded.items()}
    return Checkpoint(path=path, config=config, tensors=tensors, files=files, loaded=loaded)


class Reader:
    """Hands out element ranges of tensors as views of the weights files, mapped once each.

    Each file is memory-mapped (private, never written); ``view`` returns a tensor over the
    mapped bytes, so reading costs page-table entries instead of a copy out of the page cache,
    and the first upcast reads the file's pages directly. ``prefetch`` populates a range's page
    tables ahead of use (``MADV_POPULATE_READ``; a no-op on kernels without it) and ``release``
    drops them again (``MADV_DONTNEED``), so the resident set holds the chunks in flight, never
    the files. Tensors of a pickled checkpoint are views of its ``torch.load(mmap=True)`` tensors.
    Views must be treated as read-only, and dropped before ``close``.
    """

    _POPULATE_READ = 22                     # MADV_POPULATE_READ (Linux 5.14), not in Python 3.11's mmap

    def __init__(self) -> None:
        self._maps: dict[Path, tuple[mmap.mmap, torch.Tensor]] = {}
        self._populate = True

    def _map(self, file: Path) -> tuple[mmap.mmap, torch.Tensor]:
        entry = self._maps.get(file)
        if entry is None:
            try:
                with open(file, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise MergeError(f"{file}: cannot read: {getattr(e, 'strerror', None) or e}") from None
            entry = self._maps[file] = (mm, torch.frombuffer(mm, dtype=torch.uint8))
        return entry

    def view(self, ckpt: Checkpoint, name: str, start: int, count: int) -> torch.Tensor:
        """Elements ``[start, start + count)`` of tensor ``name`` (flattened), in the stored dtype."""
        info = ckpt.tensors[name]
        if info.offset < 0:
            return ckpt.loaded[name].reshape(-1)[start:start + count]
        size = info.dtype.itemsize
        off = info.offset + start * size
        mm, whole = self._map(info.file)
        if len(mm) < off + count * size:
            raise MergeError(f"{info.file}: unexpected end of file while reading tensor {name!r} (truncated?)")
        if off % size == 0:
            return whole[off:off + count * size].view(info.dtype)
        return torch.frombuffer(mm, dtype=info.dtype, count=count, offset=off)   # unaligned data section

    def _advise(self, ckpt: Checkpoint, name: str, start: int, count: int, advice: int) -> None:
        info = ckpt.tensors[name]
        if info.offset < 0 or count <= 0:
            return
        mm, _ = self._map(info.file)
        begin = info.offset + start * info.dtype.itemsize
        first = begin - begin % mmap.PAGESIZE
        mm.madvise(advice, first, begin + count * info.dtype.itemsize - first)

    def prefetch(self, ckpt: Checkpoint, name: str, start: int, count: int) -> None:
        """Map the pages of a range now (the range is read soon)."""
        if self._populate:
            try:
                self._advise(ckpt, name, start, count, self._POPULATE_READ)
            except OSError:                  # kernel without MADV_POPULATE_READ: pages fault in on use
                self._populate = False

    def release(self, ckpt: Checkpoint, name: str, start: int, count: int) -> None:
        """Unmap the pages of a range from this process (they stay in the page cache)."""
        self._advise(ckpt, name, start, count, mmap.MADV_DONTNEED)

    def close(self) -> None:
        while self._maps:
            mm, whole = self._maps.popitem()[1]
            del whole
            try:
                mm.close()
            except BufferError:              # a view is still referenced: the mapping goes with it
                pass


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
