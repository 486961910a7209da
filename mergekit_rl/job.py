"""One planned job, start to finish: `Options` shared by every weight command, the inputs opened,
the plan streamed by the engine into an atomic output folder, then the side files, the
provenance record and the model card. `vectors` (extract / add / subtract) and `merge` use it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import engine, hub, provenance
from .checkpoint import DEFAULT_MAX_SHARD, Checkpoint, CheckpointWriter, copy_side_files
from .errors import ConfigError
from .output import atomic_folder
from .plan import Item, Plan, Selection, parse_dtype

log = logging.getLogger(__name__)

# progress(total_bytes, total_tensors) -> per-block callback; supplied by the CLI.
ProgressFactory = Callable[[int, int], engine.ProgressFn]


@dataclass(frozen=True)
class Options:
    """Settings shared by every operation; validated before any input is opened."""

    dtype: str = "auto"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    device: str = "auto"
    overwrite: bool = False
    allow_vocab_mismatch: bool = False
    max_shard_size: int = DEFAULT_MAX_SHARD
    block_bytes: int = engine.DEFAULT_BLOCK_BYTES
    threads: int | None = None  # CPU compute threads; None: engine.default_threads()
    full_hash: bool = False
    command: str = ""

    def __post_init__(self):
        parse_dtype(self.dtype)
        _ = self.selection  # compiles the regexes
        try:
            engine.resolve_device(self.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.max_shard_size <= 0:
            raise ConfigError(f"--max-shard-size {self.max_shard_size}: must be positive")
        if self.block_bytes <= 0:
            raise ConfigError(f"--block-size {self.block_bytes}: must be positive")
        engine.check_threads(self.threads)

    @property
    def selection(self) -> Selection:
        return Selection(tuple(self.include), tuple(self.exclude))

    @property
    def out_dtype(self) -> torch.dtype | None:
        return parse_dtype(self.dtype)


@dataclass
class Result:
    out: Path
    tensors: int
    computed: int
    bytes_written: int
    seconds: float
    device: str
    notes: list[str] = field(default_factory=list)
    engine: engine.Stats | None = None  # bytes moved and time per stage, for the summary


@contextlib.contextmanager
def opened(sources: dict[str, hub.Source]):
    ckpts: dict[str, Checkpoint] = {}
    try:
        for role, src in sources.items():
            ckpts[role] = Checkpoint.open(src.path)
        yield ckpts
    finally:
        for c in ckpts.values():
            c.close()


def execute(kind: str, formula: str, sources: dict[str, hub.Source],
             ckpts: dict[str, Checkpoint], plan: Plan, fn: engine.ComputeFn, out: Path,
             options: Options, progress: ProgressFactory | None, *, side_from: Path,
             side_names: tuple[str, ...] | None, tags: list[str], extra: dict,
             whole_tensors: bool = False, finalize: Callable[[Path], None] | None = None
             ) -> Result:
    """Stream a plan into an atomic output folder, then add side files, provenance and card."""
    for note in plan.notes:
        log.warning(note)
    device = engine.resolve_device(options.device)
    start = time.perf_counter()
    entries = [(i.name, i.dtype, i.shape) for i in plan.items]
    engine.check_block_size(plan.items, options.block_bytes, whole_tensors)
    with atomic_folder(out) as tmp:
        writer = CheckpointWriter(tmp, entries, options.max_shard_size,
                                  metadata={"mergekit_rl": kind})
        try:
            total = writer.total_size
            callback = progress(total, len(plan.items)) if progress else None
            stats = engine.run(plan.items, ckpts, fn, writer, device,
                               block_bytes=options.block_bytes, whole_tensors=whole_tensors,
                               threads=options.threads, progress=callback)
            writer.finish()
        finally:
            writer.close()
        names = side_names if side_names is not None else ()
        dtype = options.out_dtype if kind == "model" else None
        if side_names is None:
            copy_side_files(side_from, tmp, dtype=dtype)
        else:
            copy_side_files(side_from, tmp, names=names)
        record = provenance.build_record(
            kind, formula,
            [provenance.input_record(role, sources[role], ckpts[role], options.full_hash)
             for role in sources],
            command=options.command, out_dtype=_dtype_label(plan.items),
            selection={"include": list(options.include), "exclude": list(options.exclude)},
            notes=plan.notes, extra=extra)
        provenance.write_record(tmp, record)
        license = provenance.card_license(sources["target"].path) if "target" in sources \
            else provenance.card_license(sources[next(iter(sources))].path)
        provenance.write_card(tmp, record, tags, license)
        if finalize:
            finalize(tmp)
    return Result(out, len(plan.items), plan.computed, total, time.perf_counter() - start,
                  str(device), plan.notes, stats)


def _dtype_label(items: list[Item]) -> str:
    kinds = sorted({str(i.dtype).removeprefix("torch.") for i in items
                    if i.dtype.is_floating_point})
    return "/".join(kinds) or "none"
