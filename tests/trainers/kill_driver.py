"""`python kill_driver.py [--kill-at N | --kill-in-final-save] train KIND CONFIG ...`: the
trainers' command line, SIGKILLed at a chosen moment (for the resume tests; also under
torchrun, where rank 0 is killed and the launcher stops the rest).

--kill-at N           SIGKILL right after step N is logged: between checkpoints.
--kill-in-final-save  SIGKILL after the first file of the final model is moved into place.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    args = sys.argv[1:]
    rank0 = os.environ.get("RANK", "0") == "0"
    if "--kill-at" in args:
        i = args.index("--kill-at")
        kill_at = int(args[i + 1])
        del args[i:i + 2]
        from trainers import metrics

        real = metrics.MetricsLogger.advance

        def advance(self, step, values):
            real(self, step, values)
            if step == kill_at and rank0:
                _die()

        metrics.MetricsLogger.advance = advance
    if "--kill-in-final-save" in args:
        args.remove("--kill-in-final-save")
        from trainers import checkpointing

        real_replace = os.replace
        moved = []

        def replace(src, dst):
            real_replace(src, dst)
            moved.append(dst)
            if "final.tmp" in str(src) and rank0:
                _die()

        checkpointing.os = type(sys)("os_proxy")
        checkpointing.os.__dict__.update(os.__dict__)
        checkpointing.os.replace = replace
    from trainers.__main__ import main as cli

    cli(args, prog_name="kill_driver")


if __name__ == "__main__":
    main()
