"""The one module that owns the checkpoint file layout: reading, writing, sharding, the index.

Reading: every safetensors header is validated by the safetensors library (`safe_open` checks the
JSON, the offsets and that the data covers the file) before we trust its offsets; tensor bytes are
then read with `pread` straight into a fresh buffer. This keeps memory at the tensors in flight
(no mmap growing with the model), allows reading a block of rows of a huge tensor, and gives
pinned buffers for fast host-to-GPU copies.

Writing: all output shapes and dtypes are known before any data is read, so each shard's header
is written first and tensor bytes are `pwrite`n to their final offsets, in any order and from a
background thread. `safetensors.torch.save_file` needs the whole shard in memory and wrote 7x
slower than raw writes on our machines (SPEC §5).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
LEGACY_NAMES = ("pytorch_model.bin.index.json", "pytorch_model.bin")
DEFAULT_MAX_SHARD = 5 * 1000**3
SAMPLE_BYTES = 4096  # per sampled window of a tensor in the default fingerprint

# Files that travel with a model: the config, tokenizer and chat template.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int = -1  # absolute offset of the first byte; -1 for legacy .bin tensors

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * dtype_size(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parse_size(text: str | int) -> int:
    """'500MB' / '2GB' / '5GiB' / 1234 → bytes (decimal units, as transformers does)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise ValueError(f"invalid size {text!r}: expected e.g. 500MB, 2GB or a byte count")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}
    if m.group(2) not in units:
        raise ValueError(f"invalid size {text!r}: unknown unit {m.group(2)!r}")
    return int(float(m.group(1)) * units[m.group(2)])


def _read_header(path: Path) -> tuple[dict, int, bytes]:
    """Validate with the safetensors parser, then return (header dict, data start, raw header)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # safetensors raises its own error type for every corruption
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({e}); re-download or re-save it"
        ) from None
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    return json.loads(raw), 8 + n, raw


class Checkpoint:
    """A model or vector folder: single file, shards + index, or legacy `.bin` (weights only)."""

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], files: list[Path],
                 headers: dict[Path, bytes], legacy_state: dict | None = None):
        self.path = path
        self.tensors = tensors
        self.files = files
        self.headers = headers
        self._legacy = legacy_state
        self._fds: dict[Path, int] = {}

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if path.is_file() and path.suffix == ".safetensors":
            return cls._from_files(path.parent, [path])
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder; give a checkpoint folder "
                                  "or a Hub id like org/name[@revision]")
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint folder or a .safetensors file")
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if (path / INDEX_NAME).exists():
            indexes = [path / INDEX_NAME]
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several safetensors index files "
                                  f"({', '.join(p.name for p in indexes)}); keep one")
        if indexes:
            return cls._from_index(path, indexes[0])
        files = sorted(path.glob("*.safetensors"))
        if (path / SINGLE_NAME).exists():
            files = [path / SINGLE_NAME]
        if files:
            return cls._from_files(path, files)
        for name in LEGACY_NAMES:
            if (path / name).exists():
                return cls._from_legacy(path, path / name)
        raise CheckpointError(f"{path}: no *.safetensors, index or pytorch_model.bin found; "
                              "is this a model folder?")

    @classmethod
    def _from_index(cls, folder: Path, index_path: Path) -> Checkpoint:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("empty weight_map")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: bad index ({e}); expected "
                                  '{"weight_map": {tensor: file}}') from None
        shard_names = sorted(set(weight_map.values()))
        for s in shard_names:
            if "/" in s or "\\" in s or not (folder / s).is_file():
                raise CheckpointError(f"{index_path}: shard {s!r} listed in the index is missing; "
                                      "re-download the checkpoint")
        ckpt = cls._from_files(folder, [folder / s for s in shard_names])
        tensors = {}
        for name, shard in weight_map.items():
            info = ckpt.tensors.get(name)
            if info is None or info.file.name != shard:
                raise CheckpointError(f"{index_path}: tensor {name!r} is not in shard {shard!r}; "
                                      "the index does not match the shards")
            tensors[name] = info
        ckpt.tensors = tensors
        return ckpt

    @classmethod
    def _from_files(cls, folder: Path, files: list[Path]) -> Checkpoint:
        tensors: dict[str, TensorInfo] = {}
        headers = {}
        for file in files:
            header, start, raw = _read_header(file)
            headers[file] = raw
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if name in tensors:
                    raise CheckpointError(f"{folder}: tensor {name!r} appears in both "
                                          f"{tensors[name].file.name} and {file.name}")
                if meta["dtype"] not in DTYPES:
                    raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype "
                                          f"{meta['dtype']}")
                tensors[name] = TensorInfo(name, DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                           file, start + meta["data_offsets"][0])
        return cls(folder, tensors, list(files), headers)

    @classmethod
    def _from_legacy(cls, folder: Path, path: Path) -> Checkpoint:
        files = [path]
        if path.name.endswith(".index.json"):
            weight_map = json.loads(path.read_text())["weight_map"]
            files = [folder / s for s in sorted(set(weight_map.values()))]
        state: dict[str, torch.Tensor] = {}
        for file in files:
            try:  # weights_only: never unpickle code; mmap: do not load the file into memory
                state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read legacy weights ({e}); convert the "
                                      "checkpoint to safetensors") from None
        tensors = {k: TensorInfo(k, v.dtype, tuple(v.shape), files[0]) for k, v in state.items()}
        log.warning("%s: reading legacy pytorch_model.bin (weights only)", folder)
        return cls(folder, tensors, files, {}, legacy_state=state)

    # ---- reading ---------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, rows: tuple[int, int] | None = None, pin: bool = False,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor `name` (or rows [r0, r1) of its first dimension) in its stored dtype,
        into `out` (a uint8 buffer of at least that many bytes, e.g. one reused for every block)
        or a new buffer (pinned with `pin`). A file that cannot be read or has become shorter
        than its header says is a CheckpointError naming it."""
        info = self.tensors[name]
        shape = info.shape
        start, nbytes = info.offset, info.nbytes
        if rows is not None:
            row_bytes = info.nbytes // shape[0] if shape[0] else 0
            start += rows[0] * row_bytes
            nbytes = (rows[1] - rows[0]) * row_bytes
            shape = (rows[1] - rows[0],) + shape[1:]
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) if out is None else \
            out[:nbytes]
        if self._legacy is not None:
            t = self._legacy[name]
            t = t if rows is None else t[rows[0]:rows[1]]
            return buf.view(info.dtype).reshape(shape).copy_(t)
        if nbytes:
            _pread_into(self._fd(info.file), buf.numpy(), start, info.file)
        return buf.view(info.dtype).reshape(shape)

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{file}: cannot open it for reading "
                                      f"({e.strerror or e}); check that it exists and is "
                                      "readable") from None
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- facts for planning and provenance -------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def config(self) -> dict:
        p = self.path / "config.json"
        try:
            return json.loads(p.read_text()) if p.exists() else {}
        except ValueError as e:
            raise CheckpointError(f"{p}: invalid JSON ({e})") from None

    def fingerprints(self, full_hash: bool = False) -> list[dict]:
        """Per file: name, size, and `sha256` of the whole file (`full_hash`: a second full read)
        or `sample_sha256`, of its header and of every tensor's first, middle and last
        `SAMPLE_BYTES` (all of a smaller tensor; for a legacy file, 64 windows spread over it).

        The sample costs a few MB of reads from the page cache the run just filled, and tells
        apart any two models whose tensors differ broadly (every fine-tune, every merge),
        which a header hash cannot: models of one shape share their header. A change confined
        to bytes outside the windows goes unseen; `full_hash` is for that."""
        out = []
        for file in self.files:
            rec = {"file": file.name, "bytes": file.stat().st_size}
            if full_hash:
                rec["sha256"] = file_sha256(file)
            else:
                rec["sample_sha256"] = self._sample_sha256(file, rec["bytes"])
            out.append(rec)
        return out

    def _sample_sha256(self, file: Path, size: int) -> str:
        h = hashlib.sha256()
        if file in self.headers:
            h.update(self.headers[file])
            spans = sorted((t.offset, t.nbytes) for t in self.tensors.values() if t.file == file)
        else:  # legacy pickle: no tensor offsets
            step = max(size // 64, 1)
            spans = [(k * step, min(step, size - k * step)) for k in range(min(64, size))]
        w = SAMPLE_BYTES
        windows = []
        for offset, nbytes in spans:
            if nbytes <= 3 * w:
                windows.append((offset, nbytes))
            else:
                windows += [(offset, w), (offset + (nbytes - w) // 2, w), (offset + nbytes - w, w)]
        buf = bytearray(max((n for _, n in windows), default=0))
        for offset, nbytes in windows:
            view = memoryview(buf)[:nbytes]
            _pread_into(self._fd(file), view, offset, file)
            h.update(view)
        return h.hexdigest()


def _pread_into(fd: int, arr, offset: int, file: Path) -> None:
    view = memoryview(arr).cast("B")
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:  # EIO from a failing disk or a network filesystem going away
            raise CheckpointError(f"{file}: read failed at byte {offset + done} "
                                  f"({e.strerror or e}); check the disk or re-download the "
                                  "file") from None
        if n <= 0:
            raise CheckpointError(f"{file}: file ended early at byte {offset + done} (expected "
                                  f"{offset + len(view)}); it is truncated or was changed "
                                  "while being read, re-download it")
        done += n


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class CheckpointWriter:
    """Writes a (sharded) safetensors checkpoint whose layout is fixed up front.

    `entries` gives every output tensor as (name, dtype, shape) in file order. Headers are
    written at construction; `write` puts a tensor (or a block of its rows) at its final offset
    and may be called in any order, from any one thread at a time; `finish` checks that every
    byte was written and writes the index.
    """

    def __init__(self, folder: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_size: int = DEFAULT_MAX_SHARD, metadata: dict[str, str] | None = None):
        self.folder = folder
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for e in entries:
            nbytes = numel(e[2]) * dtype_size(e[1])
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += nbytes
        n = len(shards)
        names = ([SINGLE_NAME] if n == 1 else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.files = [folder / name for name in names]
        self.places: dict[str, tuple[int, int, int, torch.dtype, tuple[int, ...]]] = {}
        self._remaining: dict[str, int] = {}
        self._fds: list[int] = []
        meta = {"format": "pt", **(metadata or {})}
        for i, (file, shard) in enumerate(zip(self.files, shards)):
            header: dict = {"__metadata__": meta}
            offset = 0
            for name, dtype, shape in shard:
                nbytes = numel(shape) * dtype_size(dtype)
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # 8-byte alignment, as the reference writer does
            start = 8 + len(raw)
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(fd, start + offset)
            for name, dtype, shape in shard:
                begin = header[name]["data_offsets"][0]
                self.places[name] = (i, start + begin, numel(shape) * dtype_size(dtype), dtype,
                                     shape)
                self._remaining[name] = numel(shape) * dtype_size(dtype)
        self.total_size = sum(p[2] for p in self.places.values())

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        shard, offset, nbytes, dtype, shape = self.places[name]
        if tensor.dtype != dtype or tuple(tensor.shape[1:]) != tuple(shape[1:]):
            raise ValueError(f"internal: {name} planned {dtype}{shape}, got "
                             f"{tensor.dtype}{tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        row_bytes = nbytes // shape[0] if shape and shape[0] else 0
        offset += row_start * row_bytes
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fds[shard], view[done:], offset + done)
        self._remaining[name] -= len(view)

    def finish(self) -> None:
        missing = [n for n, left in self._remaining.items() if left]
        if missing:
            raise RuntimeError(f"internal: tensors not fully written: {missing[:5]}")
        self.close()
        if len(self.files) > 1:
            shard_of = {n: self.files[p[0]].name for n, p in self.places.items()}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": shard_of}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def copy_side_files(src: Path, dst: Path, names: tuple[str, ...] = SIDE_FILES,
                    dtype: torch.dtype | None = None) -> list[str]:
    """Copy config/tokenizer/chat-template files; set the config's dtype when it changed."""
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    cfg = dst / "config.json"
    if dtype is not None and cfg.exists():
        data = json.loads(cfg.read_text())
        dname = str(dtype).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = dname
        cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return copied
