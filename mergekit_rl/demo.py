"""`mergekit-rl demo`: the vector workflow on tiny models built here, with no network.

Builds a tiny Qwen2 base and three siblings (SFT, GRPO = SFT + a change, instruct), extracts the
vector GRPO − SFT, adds it to the instruct sibling, subtracts it again, and checks every result
against an in-memory recomputation. Stages are reused on re-runs unless `fresh`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .inspection import inspect_checkpoint
from .operations import Options, apply, extract


def _state(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint.open(path) as ckpt:
        return {name: ckpt.read(name) for name in ckpt.tensors}


def run_demo(out: Path, fresh: bool = False) -> Iterator[str]:
    from transformers.utils import logging as hf_logging

    from .tiny import build_model, build_tokenizer, finetune_copy  # transformers only here

    hf_logging.disable_progress_bar()

    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    if not (models / ".done").exists():
        shutil.rmtree(models, ignore_errors=True)
        tok = build_tokenizer(models / "tokenizer")
        kw = dict(arch="qwen2", tied=True, hidden_size=64, intermediate_size=128, num_layers=4,
                  tokenizer_dir=models / "tokenizer")
        build_model(models / "base", seed=0, **kw)
        finetune_copy(models / "base", models / "sft", seed=1)
        finetune_copy(models / "sft", models / "grpo", seed=2)
        finetune_copy(models / "base", models / "instruct", seed=3)
        (models / ".done").touch()
        yield f"built tokenizer ({len(tok)} tokens) and tiny Qwen2 base/sft/grpo/instruct"
    else:
        yield f"reusing models in {models}"
    opts = Options(overwrite=True)
    steps = [
        ("extract grpo sft", lambda: extract(str(models / "grpo"), str(models / "sft"),
                                             out / "vector", opts)),
        ("add instruct vector", lambda: apply(str(models / "instruct"), str(out / "vector"),
                                              out / "instruct_plus_v", 1.0, opts)),
        ("subtract instruct vector", lambda: apply(str(models / "instruct"), str(out / "vector"),
                                                   out / "instruct_minus_v", 1.0, opts,
                                                   subtract=True)),
    ]
    for label, step in steps:
        r = step()
        yield (f"mergekit-rl {label}: {r.tensors} tensors, {r.bytes_written / 1e6:.2f} MB, "
               f"{r.seconds:.2f}s → {r.out}")
    grpo, sft, inst = (_state(models / n) for n in ("grpo", "sft", "instruct"))
    plus, minus = _state(out / "instruct_plus_v"), _state(out / "instruct_minus_v")
    worst = 0.0
    for k in inst:
        v = grpo[k] - sft[k]
        worst = max(worst, float((plus[k] - (inst[k] + v)).abs().max()),
                    float((minus[k] - (inst[k] - v)).abs().max()))
    yield f"check against an in-memory recomputation: max |difference| = {worst:.3g}"
    if worst > 1e-6:
        raise RuntimeError(f"demo check failed: outputs differ by {worst}")
    report = inspect_checkpoint(str(out / "vector"))
    yield (f"vector: {report.tensors} tensors, L2 norm {report.total.l2:.4g}; per group: "
           + ", ".join(f"{g.name} {g.l2:.3g}" for g in report.groups))
