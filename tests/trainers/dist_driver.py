"""`torchrun --nproc_per_node 2 dist_driver.py JOBS.json`: several trainer command lines run one
after the other in the same processes (one launch pays the start-up once). Each job is the
argument list of `python -m trainers` (e.g. ["train", "sft", CONFIG, "--set", ...]), or
["copy", SRC, DST] (rank 0 copies a file, e.g. metrics.jsonl, before a job rewrites it)."""

from __future__ import annotations

import json
import os
import shutil
import sys


def main() -> None:
    from trainers.__main__ import main as cli

    for job in json.loads(open(sys.argv[1]).read()):
        if job[0] == "copy":
            if os.environ.get("RANK", "0") == "0":
                shutil.copy(job[1], job[2])
            continue
        cli(job, prog_name="dist_driver", standalone_mode=False)


if __name__ == "__main__":
    main()
