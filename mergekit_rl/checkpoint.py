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

import contextlib
import hashlib
import json
import logging
import mmap
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
                 headers: dict[Path, bytes], legacy_state: dict | None = None,
                 fetch=None):
        self.path = path
        self.tensors = tensors
        self.files = files
        self.headers = headers
        self._legacy = legacy_state
        self._fds: dict[Path, int] = {}
        # fetch(file, start, nbytes) -> bytes: a checkpoint whose files are remote (header-only;
        # data, when asked for, by HTTP range requests). None: local files.
        self._fetch = fetch

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
    def from_headers(cls, folder: Path, raw_headers: dict[str, bytes], fetch) -> Checkpoint:
        """A checkpoint known from its files' raw headers only (a Hub repo read by range
        requests): `raw_headers` maps file name → header bytes; `fetch(file, start, n)` reads
        data. `folder` holds the small side files (config, tokenizer, index)."""
        tensors: dict[str, TensorInfo] = {}
        files, headers = [], {}
        for name, raw in raw_headers.items():
            file = folder / name
            for t, info in header_tensors(file, parse_header(raw, name), 8 + len(raw)).items():
                if t in tensors:
                    raise CheckpointError(f"{folder}: tensor {t!r} appears in both "
                                          f"{tensors[t].file.name} and {name}")
                tensors[t] = info
            files.append(file)
            headers[file] = raw
        return cls(folder, tensors, files, headers, fetch=fetch)

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
            for name, info in header_tensors(file, header, start).items():
                if name in tensors:
                    raise CheckpointError(f"{folder}: tensor {name!r} appears in both "
                                          f"{tensors[name].file.name} and {file.name}")
                tensors[name] = info
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

    def file_subset(self, names: set[str]) -> Checkpoint:
        """The same checkpoint restricted to the files named (e.g. one of a Hub adapter's)."""
        files = [f for f in self.files if f.name in names]
        return Checkpoint(self.path, {n: t for n, t in self.tensors.items()
                                      if t.file.name in names}, files,
                          {f: h for f, h in self.headers.items() if f.name in names},
                          fetch=self._fetch)

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
        start, nbytes, shape = self._extent(info, rows)
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) if out is None else \
            out[:nbytes]
        if self._fetch is not None:  # remote (header-only) checkpoint: HTTP range request
            if nbytes:
                buf.copy_(torch.frombuffer(bytearray(self._fetch(info.file, start, nbytes)),
                                           dtype=torch.uint8))
            return buf.view(info.dtype).reshape(shape)
        if self._legacy is not None:
            t = self._legacy[name]
            t = t if rows is None else t[rows[0]:rows[1]]
            return buf.view(info.dtype).reshape(shape).copy_(t)
        if nbytes:
            _pread_into(self._fd(info.file), buf.numpy(), start, info.file)
        return buf.view(info.dtype).reshape(shape)

    def read_into(self, name: str, rows: tuple[int, int] | None, out: torch.Tensor) -> int:
        """Read tensor `name` (or rows [r0, r1)) flattened into `out[:n]` in out's dtype
        (float32 for `compare`), converting on the way; returns n. A local file of another
        dtype is mapped for the block and converted from the page cache, so its bytes are not
        copied twice (a read then a widening); the file's size is checked first, since touching
        a mapping past its end would kill the process instead of raising."""
        info = self.tensors[name]
        start, nbytes, _ = self._extent(info, rows)
        count = nbytes // info.dtype.itemsize
        if info.dtype == out.dtype:
            self.read(name, rows, out=out.view(torch.uint8))
            return count
        if self._fetch is not None or self._legacy is not None or count == 0:
            out[:count].copy_(self.read(name, rows).reshape(-1))
            return count
        fd = self._fd(info.file)
        if os.fstat(fd).st_size < start + nbytes:
            raise CheckpointError(f"{info.file}: file ended early (expected at least "
                                  f"{start + nbytes} bytes); it is truncated or was changed "
                                  "while being read, re-download it")
        base = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(fd, start + nbytes - base, offset=base, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot map bytes {start}-{start + nbytes} "
                                  f"({e.strerror or e}); check the disk or re-download the "
                                  "file") from None
        src = None
        try:
            src = torch.frombuffer(mapped, dtype=info.dtype, count=count, offset=start - base)
            out[:count].copy_(src)
        finally:
            del src  # the mapping closes only once nothing views it
            mapped.close()
        return count

    @staticmethod
    def _extent(info, rows: tuple[int, int] | None) -> tuple[int, int, tuple[int, ...]]:
        """(file offset, bytes, shape) of a tensor or of rows [r0, r1) of its first dimension."""
        if rows is None:
            return info.offset, info.nbytes, info.shape
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        return (info.offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes,
                (rows[1] - rows[0],) + tuple(info.shape[1:]))

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
            if self._fetch is not None:  # remote: the header is what we have
                out.append({"file": file.name,
                            "header_sha256": hashlib.sha256(self.headers[file]).hexdigest()})
                continue
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
        try:
            self._open_shards(shards, meta)
        except BaseException:
            with contextlib.suppress(OSError):
                self.close()
            raise
        self.total_size = sum(p[2] for p in self.places.values())

    def _open_shards(self, shards: list, meta: dict) -> None:
        """Write every shard's header and size its file (sparse until the data arrives)."""
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
            with _naming(file):
                os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
                os.ftruncate(fd, start + offset)
            for name, dtype, shape in shard:
                begin = header[name]["data_offsets"][0]
                self.places[name] = (i, start + begin, numel(shape) * dtype_size(dtype), dtype,
                                     shape)
                self._remaining[name] = numel(shape) * dtype_size(dtype)

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
        with _naming(self.files[shard]):
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
        fds, self._fds = self._fds, []
        error = None
        for file, fd in zip(self.files, fds):
            try:
                with _naming(file):
                    os.close(fd)
            except OSError as e:  # close every fd, then report the first failure
                error = error or e
        if error is not None:
            raise error


@contextlib.contextmanager
def _naming(file: Path):
    """`os.pwrite` & co raise OSErrors without a file name: add it, so a full disk or a failing
    device is reported against the file (and the output folder) it happened in."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(file)) from None


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


# ---- what a folder is ------------------------------------------------------------------------

FOLDER_KINDS = ("model", "vector", "adapter")
ADAPTER_CONFIG = "adapter_config.json"
KIND_KEY = "mergekit_rl"  # our writer's safetensors __metadata__: {"mergekit_rl": kind}


def folder_kind(path: str | Path) -> str | None:
    """"model", "vector" or "adapter" for a checkpoint folder; None when it cannot be told.

    In order: a PEFT `adapter_config.json`; the kind our writer puts in every shard's
    safetensors `__metadata__`; for folders made elsewhere, a cheap look at a few 1-D norm
    weights (a model's sit near 1, a task vector's near 0). Reads headers and at most a few
    KB of data."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    try:
        with Checkpoint.open(path) as ckpt:
            return checkpoint_kind(ckpt)
    except CheckpointError:
        return None


def checkpoint_kind(ckpt: Checkpoint) -> str | None:
    """`folder_kind` for an open checkpoint."""
    if (ckpt.path / ADAPTER_CONFIG).is_file():
        return "adapter"
    for raw in list(ckpt.headers.values())[:1]:
        meta = json.loads(raw).get("__metadata__") or {}
        if meta.get(KIND_KEY) in FOLDER_KINDS:
            return meta[KIND_KEY]
    return _guess_kind(ckpt)


def _guess_kind(ckpt: Checkpoint, samples: int = 4) -> str | None:
    norms = [i for n, i in ckpt.tensors.items() if len(i.shape) == 1 and i.is_float
             and "norm" in n.lower() and n.endswith("weight") and i.shape[0] > 0]
    if not norms:
        return None
    values = torch.cat([ckpt.read(i.name).float() for i in norms[:samples]])
    level = float(values.abs().mean())
    if level > 0.5:
        return "model"
    # Gemma stores RMSNorm weights as w in x·(1 + w): near 0 in a model as in a vector.
    if level < 0.1 and not str(ckpt.config().get("model_type", "")).startswith("gemma"):
        return "vector"
    return None


# ---- quantised checkpoints -------------------------------------------------------------------

# Tensor names that only quantised checkpoints have: FP8 scales (DeepSeek-V3, Qwen3 FP8),
# GPTQ/AWQ packed weights, bitsandbytes states.
QUANT_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale", ".qweight", ".qzeros",
                  ".scales", ".g_idx", ".absmax", ".quant_map", ".quant_state", ".SCB",
                  ".weight_format", ".nested_absmax", ".nested_quant_map")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantization(ckpt: Checkpoint) -> str | None:
    """How a checkpoint is quantised, from its config and headers alone (no tensor data);
    None for a plain floating-point checkpoint."""
    cfg = ckpt.config().get("quantization_config")
    if cfg:
        if not isinstance(cfg, dict):
            return "config.json quantization_config"
        block = cfg.get("weight_block_size")
        return (f"config.json quantization_config: {cfg.get('quant_method', 'unknown method')}"
                + (f", weight_block_size {block}" if block else ""))
    names = ckpt.tensors
    fp8 = [n for n, i in names.items() if i.dtype in FP8_DTYPES]
    if fp8:
        scaled = any(n.endswith("_scale_inv") or n.endswith("_scale") for n in names)
        return (f"FP8 weights ({DTYPE_NAMES[names[fp8[0]].dtype]}, e.g. {fp8[0]})"
                + (" with weight_scale_inv scales" if scaled else ""))
    for name, info in names.items():
        if name.endswith(QUANT_SUFFIXES):
            return f"quantisation tensor {name}"
        if info.dtype in (torch.int8, torch.uint8) and name.endswith(".weight"):
            # bitsandbytes int8 (I8 + SCB), 4-bit (U8 packed): 8-bit "weights" beside floats
            return f"8-bit integer weight {name} ({DTYPE_NAMES[info.dtype]})"
    return None


def check_not_quantized(ckpt: Checkpoint) -> None:
    """Refuse a quantised checkpoint before any tensor data is read: its stored values are not
    the weights (FP8 needs its scales, GPTQ/AWQ/bitsandbytes pack several weights per value)."""
    what = quantization(ckpt)
    if what is None:
        return
    raise CheckpointError(
        f"{ckpt.path}: quantised checkpoint ({what}); mergekit-rl works on floating-point "
        "weights: use the unquantised (BF16) release, or dequantise it first (FP8: transformers "
        "from_pretrained(..., quantization_config=FineGrainedFP8Config(dequantize=True)), then "
        "save_pretrained)")


# ---- header-only checkpoints, sequential writing ---------------------------------

def header_tensors(file: Path, header: dict, start: int) -> dict[str, TensorInfo]:
    """The TensorInfos of one parsed safetensors header whose data begins at byte `start`."""
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype "
                                  f"{meta.get('dtype')}")
        out[name] = TensorInfo(name, DTYPES[meta["dtype"]], tuple(meta["shape"]), file,
                               start + meta["data_offsets"][0])
    return out


def parse_header(raw: bytes, where: str) -> dict:
    """A safetensors header's JSON (the bytes after the 8-byte length), checked to be a map."""
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        return header
    except ValueError as e:
        raise CheckpointError(f"{where}: not a valid safetensors header ({e})") from None


class SequentialWriter:
    """One safetensors file written tensor by tensor, in a fixed order, when only upper bounds
    of the shapes are known up front (a low-rank factor's rank is found as it is computed).

    The header is reserved at its largest possible size (every dimension at its bound), the
    data is appended behind it as tensors arrive, and `finish` writes the real header padded
    with spaces (valid JSON whitespace) to the reserved size. Memory: the tensor in flight."""

    def __init__(self, file: Path, bounds: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.file = file
        self.order = [name for name, _, _ in bounds]
        self.meta = {"format": "pt", **(metadata or {})}
        worst = {"__metadata__": self.meta}
        total = sum(numel(s) * dtype_size(d) for _, d, s in bounds)
        for name, dtype, shape in bounds:
            worst[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                           "data_offsets": [total, total]}
        self.reserved = len(json.dumps(worst, separators=(",", ":")).encode())
        self.reserved += -self.reserved % 8
        self.entries: dict[str, dict] = {}
        self.offset = 0
        self.fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if len(self.entries) >= len(self.order) or self.order[len(self.entries)] != name:
            raise ValueError(f"internal: {name} written out of order")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data).cast("B")
        start = 8 + self.reserved + self.offset
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], start + done)
        self.entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.offset, self.offset + len(view)]}
        self.offset += len(view)

    def skip(self, name: str) -> None:
        """Leave a planned tensor out (e.g. a delta of rank 0)."""
        self.order.remove(name)

    def finish(self) -> int:
        """Write the header; returns the file size."""
        if len(self.entries) != len(self.order):
            raise RuntimeError("internal: tensors not written: "
                               f"{[n for n in self.order if n not in self.entries][:5]}")
        header = {"__metadata__": self.meta, **self.entries}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (self.reserved - len(raw))
        os.pwrite(self.fd, struct.pack("<Q", len(raw)) + raw, 0)
        self.close()
        return 8 + self.reserved + self.offset

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
