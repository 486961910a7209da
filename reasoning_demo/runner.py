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

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from mergekit_rl.errors import MergekitRLError

from .recipe import Recipe
from .stages import Context, Stages


@dataclass(frozen=True)
class Job:
    """One stage: its name, the outputs it writes (relative to OUT), what it depends on (the
    stages it reads from and the recipe fields it uses), and `call(ctx)`, which runs it and
    returns its summary (a module-level function or a partial of one: workers unpickle it)."""

    name: str
    outputs: tuple[str, ...]
    depends: tuple[tuple[str, ...], tuple[str, ...]]
    call: Callable[[Context], str | None]


def pipeline_stage(ctx: Context, name: str) -> str | None:
    """`call` of a `stages.PIPELINE` stage."""
    from .stages import PIPELINE

    return {n: fn for n, _, fn in PIPELINE}[name](ctx)


def stage_job(name: str, outputs, depends) -> Job:
    return Job(name, tuple(outputs), depends, partial(pipeline_stage, name=name))


def run_jobs(stages: Stages, jobs: list[Job], ctx: Context, workers: int) -> Iterator[str]:
    """Run (or reuse) every job, yielding each one's line as it finishes. A job starts once all
    the jobs it depends on have finished; `jobs` lists every job after those it depends on."""
    fingerprints = {j.name: stages.fingerprint(j.name, *j.depends) for j in jobs}
    if workers <= 1:  # here, in order
        for job in jobs:
            if stages.reusable(job.name, list(job.outputs), fingerprints[job.name]):
                yield stages.reused_line(job.name)
                continue
            stages.prepare(job.name, list(job.outputs))
            summary, seconds = stages.outcome(
                job.name, partial(_work, ctx.out, ctx.recipe, ctx.quiet, job.call))
            stages.record(job.name, fingerprints[job.name], seconds)
            yield stages.done_line(job.name, summary, seconds)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    others = set(multiprocessing.active_children())  # children that are not our workers
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(ctx.quiet, ctx.recipe.threads))
    # Start every worker now: the executor spawns them lazily, and then now and then ran two
    # submitted stages one after the other in a single worker (private, Python >= 3.9).
    for _ in range(workers):
        getattr(pool, "_adjust_process_count", lambda: None)()
    waiting, running, finished = list(jobs), {}, set()
    try:
        while waiting or running:
            started = True
            while started:  # reuse or start whatever became ready
                started = False
                for job in list(waiting):
                    if not set(job.depends[0]) <= finished:
                        continue
                    if stages.reusable(job.name, list(job.outputs), fingerprints[job.name]):
                        waiting.remove(job)
                        finished.add(job.name)
                        yield stages.reused_line(job.name)
                        started = True
                    elif len(running) < workers:
                        waiting.remove(job)
                        stages.prepare(job.name, list(job.outputs))
                        running[pool.submit(_work, ctx.out, ctx.recipe, ctx.quiet, job.call)] = job
                        started = True
            if not running:
                if not waiting:
                    break  # the rest was reused
                raise RuntimeError(f"internal: jobs {[j.name for j in waiting]} wait for jobs "
                                   "that are not in the list")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                names = [job.name] + [j.name for j in running.values()]
                summary, seconds = stages.outcome(job.name, partial(_result, future, names))
                stages.record(job.name, fingerprints[job.name], seconds)
                finished.add(job.name)
                yield stages.done_line(job.name, summary, seconds)
    except BaseException:
        _stop(pool, others)
        raise
    # every job done: the workers exit by themselves (terminated ones leave what they
    # registered with the resource tracker, e.g. tqdm's lock, which it then warns about)
    pool.shutdown(wait=True)


def _result(future, running: list[str]) -> tuple[str | None, float]:
    """The job's (summary, seconds); a killed worker (out of memory, a signal) breaks the pool
    and every running job with it: one line naming them, no hang."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool:
        raise MergekitRLError(f"a worker process died (killed by the system, e.g. out of "
                              f"memory?) while running {', '.join(sorted(running))}; run the "
                              "demo again to resume from the finished stages") from None


def _stop(pool, others: set) -> None:
    """Stop the workers now, stages still running included (their half-written outputs are
    removed when a rerun starts them again): shutdown alone would wait for the running stages
    to finish, and a pool broken by a dead worker no longer knows its other processes. They
    are killed, not terminated: a trainer takes SIGTERM as "checkpoint, then stop" and runs on,
    and a worker that survives its siblings can wait forever for the pool's queue lock that one
    of them held when it died."""
    import multiprocessing

    for process in set(multiprocessing.active_children()) - others:
        process.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def _work(out: Path, recipe: Recipe, quiet: bool, call: Callable[[Context], str | None]
          ) -> tuple[str | None, float]:
    import time

    t0 = time.perf_counter()
    summary = call(Context(out, recipe, quiet))
    return summary, time.perf_counter() - t0


def setup_process(threads: int) -> None:
    """What every process that runs stages sets first: torch's threads, quiet transformers, and
    glibc's allocator kept from giving back and refaulting the tiny models' blocks (the
    samplers and evaluations too; the trainers' configs say `train.cpu_malloc: cached`)."""
    import torch
    from transformers.utils import logging as hf_logging

    from trainers.runtime import set_cpu_malloc

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    set_cpu_malloc("cached")


def _init_worker(quiet: bool, threads: int) -> None:
    import ctypes
    import signal

    from mergekit_rl.console import setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the demo, which stops us
    try:  # Linux: die with the demo process (PR_SET_PDEATHSIG = 1)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    for name in ("mergekit_rl", "trainers"):
        setup_logging(name, quiet)
    setup_process(threads)
