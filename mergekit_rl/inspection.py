"""`inspect`: what a model or vector holds — tensor count, dtypes, bytes, per-layer L2 norm and
sparsity — computed by streaming blocks of rows, so memory stays small for any size."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hub
from .adapter import Adapter, open_input
from .errors import DependencyError
from .plan import layer_index
from .provenance import read_record

BLOCK_ELEMS = 16 * 2**20


@dataclass
class GroupStats:
    name: str
    tensors: int = 0
    params: int = 0
    sumsq: float = 0.0
    zeros: int = 0

    @property
    def l2(self) -> float:
        return math.sqrt(self.sumsq)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def as_dict(self) -> dict:
        return {"group": self.name, "tensors": self.tensors, "params": self.params,
                "l2_norm": self.l2, "sparsity": self.sparsity}


@dataclass
class Report:
    path: str
    kind: str
    tensors: int
    params: int
    bytes: int
    dtypes: dict[str, int]
    groups: list[GroupStats] = field(default_factory=list)
    total: GroupStats = field(default_factory=lambda: GroupStats("total"))
    header_only: bool = False  # a Hub input read by its headers: no norms

    def as_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "header_only": self.header_only,
                "tensors": self.tensors,
                "params": self.params, "bytes": self.bytes, "dtypes": self.dtypes,
                "l2_norm": self.total.l2, "sparsity": self.total.sparsity,
                "groups": [g.as_dict() for g in self.groups]}


def group_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' → 'layer 3'; embeddings, head and the rest by role."""
    layer = layer_index(name)
    if layer is not None:
        return f"layer {layer}"
    if "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
        return "embeddings"
    if name.startswith(("lm_head", "embed_out", "output.")):
        return "lm_head"
    return "other"


def _order(group: str) -> tuple[int, int]:
    if group.startswith("layer "):
        return (1, int(group.split()[1]))
    return ({"embeddings": 0, "lm_head": 3}.get(group, 2), 0)


def inspect_checkpoint(spec: str, download: bool = False) -> Report:
    """Stream every floating-point tensor once and accumulate per-group statistics in fp64. A
    Hub input is read header-only (no norms) unless `download`."""
    source = hub.resolve(spec) if download else hub.resolve_headers(spec)
    weights = hub.remote_weights(source) if source.header_only else None
    with open_input(source.path, weights) as ckpt:
        kind = read_record(source.path).get("kind", "model")
        if isinstance(ckpt, Adapter):  # read as the dense deltas it applies
            kind = "low-rank vector" if ckpt.lowrank else "adapter"
        dtypes: dict[str, int] = {}
        groups: dict[str, GroupStats] = {}
        total = GroupStats("total")
        for name, info in ckpt.tensors.items():
            label = str(info.dtype).removeprefix("torch.")
            dtypes[label] = dtypes.get(label, 0) + 1
            if not info.is_float:
                continue
            g = groups.setdefault(group_of(name), GroupStats(group_of(name)))
            g.tensors += 1
            if source.header_only:  # counts only: the data stays on the Hub
                for stats in (g, total):
                    stats.params += math.prod(info.shape)
                    stats.sumsq = stats.zeros = float("nan")
                continue
            rows = info.shape[0] if info.shape else 1
            row_elems = max(math.prod(info.shape[1:]), 1) if info.shape else 1
            step = max(BLOCK_ELEMS // row_elems, 1)
            for r0 in range(0, rows, step):
                block = (ckpt.read(name, (r0, min(r0 + step, rows))) if info.shape
                         else ckpt.read(name))
                x = block.to(torch.float64)
                for stats in (g, total):
                    stats.params += x.numel()
                    stats.sumsq += float((x * x).sum())
                    stats.zeros += int((x == 0).sum())
        ordered = sorted(groups.values(), key=lambda s: _order(s.name))
        return Report(str(spec), kind, len(ckpt.tensors),
                      sum(math.prod(t.shape) for t in ckpt.tensors.values()), ckpt.total_bytes,
                      dtypes, ordered, total, header_only=source.header_only)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a DependencyError saying what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DependencyError("--plot needs matplotlib: pip install 'mergekit-rl[plot]'") from None
    return plt


def plot_norms(report: Report, out: Path) -> None:
    """Bar chart of per-group L2 norms: the picture people look at when judging a vector."""
    plt = pyplot()
    names = [g.name.replace("layer ", "L") for g in report.groups]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.5))
    ax.bar(names, [g.l2 for g in report.groups], color="#4C72B0")
    ax.set_ylabel("L2 norm")
    ax.set_title(f"{report.kind}: {Path(report.path).name} (total L2 {report.total.l2:.4g})")
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
