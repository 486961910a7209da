"""The demo's runner when a worker process dies: no hang, one line, the other stage stopped."""

from __future__ import annotations

import time

import pytest
from helpers import (
    worker_dies,
    worker_fails_once_the_other_runs,
    worker_keeps_running_on_sigterm,
    worker_sleeps,
)

from mergekit_rl.errors import ConfigError
from reasoning_demo.recipe import make_recipe
from reasoning_demo.runner import Job, run_jobs
from reasoning_demo.stages import Context, Stages


def assert_both_stop_at_once(tmp_path, jobs: list[Job], match: str) -> None:
    """Run two jobs on two workers: the error `match` comes up within a minute (the other
    job, which would run two minutes, was stopped, not waited for), and neither is done."""
    recipe = make_recipe(quick=True)
    stages = Stages(tmp_path, recipe)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        list(run_jobs(stages, jobs, Context(tmp_path, recipe, True), workers=2))
    assert time.perf_counter() - t0 < 60
    assert not {job.name for job in jobs} & set(stages.done)


def test_a_killed_worker_is_one_error_and_stops_the_other_stage(tmp_path):
    assert_both_stop_at_once(tmp_path, [Job("sleeper", ("slept",), ((), ()), worker_sleeps),
                                        Job("victim", ("never",), ((), ()), worker_dies)],
                             "a worker process died .* while running sleeper, victim; run the "
                             "demo again")


def test_a_failed_stage_stops_a_stage_that_takes_sigterm_as_a_checkpoint(tmp_path):
    # A trainer catches SIGTERM to checkpoint and stop at its next step: the demo's stop kills,
    # or it would wait for that stage (and hang when the worker it terminated held the pool's
    # queue lock, which the survivor then waits for forever)
    assert_both_stop_at_once(
        tmp_path, [Job("trainer", ("trained",), ((), ()), worker_keeps_running_on_sigterm),
                   Job("bad", ("never",), ((), ()), worker_fails_once_the_other_runs)],
        "bad stage: fix its config")


def test_workers_that_finish_exit_cleanly(tmp_path):
    """After the last job the workers exit by themselves: terminating them left the locks they
    made (tqdm's) to the resource tracker, which warned about "leaked semaphore objects"."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent
    script = (
        "from helpers import worker_locks\n"
        "from reasoning_demo.recipe import make_recipe\n"
        "from reasoning_demo.runner import Job, run_jobs\n"
        "from reasoning_demo.stages import Context, Stages\n"
        "import pathlib, sys\n"
        "out = pathlib.Path(sys.argv[1]); recipe = make_recipe(quick=True)\n"
        "jobs = [Job(f'lock{i}', (f'l{i}',), ((), ()), worker_locks) for i in range(2)]\n"
        "print(list(run_jobs(Stages(out, recipe), jobs, Context(out, recipe, True), "
        "workers=2)))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, cwd=here,
                          env={**__import__("os").environ, "PYTHONPATH": str(here)})
    assert done.returncode == 0, done.stderr
    assert "lock0" in done.stdout and "lock1" in done.stdout
    assert "leaked" not in done.stderr, done.stderr
