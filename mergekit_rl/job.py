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
from .checkpoint import (
    DEFAULT_MAX_SHARD,
    Checkpoint,
    CheckpointWriter,
    check_not_quantized,
    checkpoint_kind,
    copy_side_files,
)
from .errors import CheckpointError, ConfigError
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
def opened(sources: dict[str, hub.Source], kinds: dict[str, str | tuple[str, ...]] | None = None,
           refuse_quantized: bool = True):
    """Open every input (models and dense vectors as `Checkpoint`, adapters and low-rank
    vectors as `adapter.Adapter`); refuse quantised checkpoints and folders of the wrong kind
    (`kinds`: role -> the kind or kinds allowed) before any tensor data is read (`check` reports
    quantisation itself: `refuse_quantized=False`). Closed when the block ends."""
    from .adapter import open_input

    ckpts: dict[str, Checkpoint] = {}
    try:
        for role, src in sources.items():
            weights = hub.remote_weights(src) if src.header_only else None
            ckpts[role] = open_input(src.path, weights)
            if refuse_quantized and isinstance(ckpts[role], Checkpoint):
                check_not_quantized(ckpts[role])
            if kinds and role in kinds:
                check_kind(ckpts[role], src.spec, kinds[role], role)
        yield ckpts
    finally:
        for c in ckpts.values():
            c.close()


def check_kind(ckpt, spec: str, expected: str | tuple[str, ...], role: str) -> None:
    """Refuse a model where a task vector belongs, a vector where a model is differenced, and
    a PEFT adapter where a model belongs (unless `expected` allows it); folders of unknown kind
    pass. A vector slot also takes adapters (our low-rank vectors are PEFT adapters)."""
    allowed = (expected,) if isinstance(expected, str) else expected
    kind = checkpoint_kind(ckpt)
    if kind is None or kind in allowed or ("vector" in allowed and kind == "adapter"):
        return
    expected = allowed[0]
    if expected == "vector":
        raise CheckpointError(
            f"{spec}: is a model, not a task vector (the {role}); make the vector first with "
            "`mergekit-rl extract FINETUNED BASE -o VECTOR`, or merge with a manifest term "
            "`{model: ...}` (delta = model − target)")
    if kind == "adapter":
        raise CheckpointError(
            f"{spec}: is a PEFT adapter, not a model (the {role}); merge it into its base model "
            "first (peft: merge_and_unload(), then save_pretrained)")
    raise CheckpointError(
        f"{spec}: is a task vector, not a model (the {role}); give the model it was extracted "
        "from, or use the vector as such (`mergekit-rl add TARGET VECTOR`, or a manifest term "
        "`{vector: ...}`)")


def execute(kind: str, formula: str, sources: dict[str, hub.Source],
             ckpts: dict[str, Checkpoint], plan: Plan, fn: engine.ComputeFn, out: Path,
             options: Options, progress: ProgressFactory | None, *, side_from: Path,
             side_names: tuple[str, ...] | None, tags: list[str], extra: dict,
             whole_tensors: bool = False, finalize: Callable[[Path], None] | None = None,
             selection: Selection | None = None) -> Result:
    """Stream a plan into an atomic output folder, then add side files, provenance and card.

    `selection` is the mask the plan was made with (default: the command line's); provenance
    records it and the floating-point tensors it left out (`excluded`)."""
    selection = options.selection if selection is None else selection
    for note in plan.notes:
        log.warning(note)
    device = engine.resolve_device(options.device)
    start = time.perf_counter()
    entries = [(i.name, i.dtype, i.shape) for i in plan.items]
    engine.check_block_size(plan.items, options.block_bytes, whole_tensors)
    with atomic_folder(out, sum(i.nbytes for i in plan.items)) as tmp:
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
            selection=selection.record(), notes=plan.notes,
            extra={"excluded": plan.excluded, **extra})
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
