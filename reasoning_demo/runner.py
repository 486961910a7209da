"""Run the demo's stages on a few worker processes, each stage as soon as the stages it reads
from are done.

A stage is a program on files (the configs, data and models earlier stages wrote) that runs
single-threaded (`recipe.threads`), so on a machine with two cores two stages run side by side
and compute what they compute one after the other: GRPO trains while the preference, judge and
Pairwise-RL stages run beside it. `workers=1` runs every stage in this process, in order.

Workers are spawned once each (so torch is imported once per worker), ignore Ctrl-C (the demo
decides) and die with the demo (`PR_SET_PDEATHSIG`), so a killed demo leaves no stage running
behind it; a rerun then redoes what was not recorded as finished in `stages.json`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .recipe import Recipe
from .stages import Context, Stages

POLL = 0.05  # seconds between looks at the running stages


@dataclass(frozen=True)
class Job:
    """One stage: its name, the outputs it writes (relative to OUT), what it depends on (the
    stages it reads from and the recipe fields it uses), and what to call: ("stage", name) for
    a `stages.PIPELINE` stage, ("eval", row, task) for the evaluation of a report row."""

    name: str
    outputs: tuple[str, ...]
    depends: tuple[tuple[str, ...], tuple[str, ...]]
    call: tuple[str, ...]


def run_jobs(stages: Stages, jobs: list[Job], ctx: Context, workers: int) -> Iterator[str]:
    """Run (or reuse) every job, yielding each one's line as it finishes. A job starts once all
    the jobs it depends on have finished; `jobs` lists every job after those it depends on."""
    fingerprints = {j.name: stages.fingerprint(j.name, *j.depends) for j in jobs}
    if workers <= 1:
        for job in jobs:
            yield stages.run(job.name, list(job.outputs), lambda job=job: call(ctx, job.call),
                             job.depends)
        return
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(
        workers, initializer=_init_worker, initargs=(ctx.quiet, ctx.recipe.threads))
    waiting, running, finished = list(jobs), {}, set()
    try:
        while waiting or running:
            started = True
            while started:  # reuse or start whatever became ready
                started = False
                for job in list(waiting):
                    if not set(job.depends[0]) <= finished:
                        continue
                    fingerprint = fingerprints[job.name]
                    if stages.reusable(job.name, list(job.outputs), fingerprint):
                        waiting.remove(job)
                        finished.add(job.name)
                        yield stages.reused_line(job.name)
                        started = True
                    elif len(running) < workers:
                        waiting.remove(job)
                        stages.prepare(job.name, list(job.outputs))
                        running[job.name] = (job, pool.apply_async(
                            _work, (ctx.out, ctx.recipe, ctx.quiet, job.call)))
                        started = True
            done = [name for name, (_, result) in running.items() if result.ready()]
            if not done:
                time.sleep(POLL)
                continue
            for name in done:
                job, result = running.pop(name)
                summary, seconds = stages.outcome(name, result.get)
                stages.record(name, fingerprints[name], seconds)
                finished.add(name)
                yield stages.done_line(name, summary, seconds)
    finally:
        pool.terminate()
        pool.join()


def call(ctx: Context, what: tuple[str, ...]) -> str | None:
    """Run one job's function in this process."""
    from .stages import PIPELINE, evaluate_row

    if what[0] == "eval":
        return evaluate_row(ctx, what[1], what[2])
    return {name: fn for name, _, fn in PIPELINE}[what[1]](ctx)


def _work(out: Path, recipe: Recipe, quiet: bool, what: tuple[str, ...]
          ) -> tuple[str | None, float]:
    t0 = time.perf_counter()
    summary = call(Context(out, recipe, quiet), what)
    return summary, time.perf_counter() - t0


def _init_worker(quiet: bool, threads: int) -> None:
    import ctypes
    import signal

    import torch
    from transformers.utils import logging as hf_logging

    from mergekit_rl.console import setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the demo, which stops us
    try:  # Linux: die with the demo process (PR_SET_PDEATHSIG = 1)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    for name in ("mergekit_rl", "trainers"):
        setup_logging(name, quiet)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
