"""`mergekit-rl demo`: the experiment's command, an entry point of the `mergekit-rl` group."""

from __future__ import annotations

import os
from pathlib import Path

import click

from mergekit_rl.console import errors_to_exit, setup_logging


@click.command()
@click.option("-o", "--out", "out", default="demo_out", show_default=True,
              type=click.Path(path_type=Path), help="Where everything goes.")
@click.option("--quick", is_flag=True,
              help="A smoke test of the pipeline (about a minute, for tests); its numbers mean "
                   "nothing.")
@click.option("--fresh", is_flag=True, help="Start again instead of reusing finished stages.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change a recipe value, e.g. --set grpo_steps=200 (repeatable).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Stages run side by side on this many processes, each single-threaded, each "
                   "stage once the stages it reads are done (default: 2, or 1 on one core). "
                   "The results do not depend on it.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@errors_to_exit
def demo(out, quick, fresh, overrides, workers, quiet):
    """Run the reasoning-vector experiment in miniature on this CPU with no network.

    Pretrains a tiny Qwen2, trains the SFT and GRPO donors and an instruct sibling, extracts
    the vector GRPO − SFT, adds and subtracts it, runs WPO and DPO, and reports held-out
    accuracies (table, OUT/report.json, OUT/report.png). Finished stages are reused.
    """
    from .demo import run_demo

    for name in ("mergekit_rl", "trainers"):
        setup_logging(name, quiet)
    if workers is None:
        workers = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1)
    for line in run_demo(out, quick=quick, fresh=fresh, overrides=overrides, quiet=quiet,
                         workers=workers):
        click.echo(line)
