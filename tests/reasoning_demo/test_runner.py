"""The demo's runner when a worker process dies: no hang, one line, the other stage stopped."""

from __future__ import annotations

import time

import pytest
from helpers import worker_dies, worker_sleeps

from mergekit_rl.errors import ConfigError
from reasoning_demo.recipe import make_recipe
from reasoning_demo.runner import Job, run_jobs
from reasoning_demo.stages import Context, Stages


def test_a_killed_worker_is_one_error_and_stops_the_other_stage(tmp_path):
    recipe = make_recipe(quick=True)
    stages = Stages(tmp_path, recipe)
    jobs = [Job("sleeper", ("slept",), ((), ()), worker_sleeps),
            Job("victim", ("never",), ((), ()), worker_dies)]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="a worker process died .* while running sleeper, "
                       "victim; run the demo again"):
        list(run_jobs(stages, jobs, Context(tmp_path, recipe, True), workers=2))
    assert time.perf_counter() - t0 < 60  # the sleeping stage was stopped, not waited for
    assert "victim" not in stages.done and "sleeper" not in stages.done
