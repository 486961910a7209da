"""Per-step metrics: `output_dir/metrics.jsonl`, accelerate trackers, a progress bar.

Only the main process writes. On resume, lines after the resumed step are dropped, so the file
always holds one uninterrupted curve.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
BAR_KEYS = ("loss", "reward", "kl")


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The rows of `metrics.jsonl` (for tests and plots)."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class MetricsLogger:
    def __init__(self, accelerator, output_dir: str | Path, run_name: str, config: dict,
                 total_steps: int, start_step: int = 0, progress_bar: bool = True):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = Path(output_dir) / METRICS_FILE
        self.bar = None
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if start_step and self.path.is_file():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
            if progress_bar:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name,
                                dynamic_ncols=True, disable=None)
        if accelerator.log_with:
            accelerator.init_trackers(run_name, config=_flat(config))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        level = logging.DEBUG if self.bar is not None and not self.bar.disable else logging.INFO
        text = " ".join(f"{k}={_short(v)}" for k, v in metrics.items())
        log.log(level, "step %d: %s", step, text)

    def advance(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: _short(metrics[k]) for k in BAR_KEYS if k in metrics},
                                 refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.accelerator.log_with:
            self.accelerator.end_training()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _short(value) -> str:
    value = _plain(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)
