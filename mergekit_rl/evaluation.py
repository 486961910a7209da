"""`mergekit-rl eval`: lm-evaluation-harness on a model we load, its table and `OUT/eval.json`.

lm-eval is an optional extra (`pip install 'mergekit-rl[eval]'`) and is imported only inside
these functions. The tasks are resolved and their datasets loaded before any model is, so an
unknown task, a dataset that cannot be had offline or a missing lm-eval costs no model load. The
model is loaded once by us (transformers, on the GPU when there is one) and handed to lm-eval's
`HFLM`, which is how the sweep changes its weights in place between evaluations. Each
evaluation is one `lm_eval.simple_evaluate` call, so its seeds, few-shot sampling and numbers
are those of the `lm_eval` command line.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from . import hub
from .errors import ConfigError, DependencyError, HubError

log = logging.getLogger(__name__)

EVAL_NAME = "eval.json"
INSTALL = "pip install 'mergekit-rl[eval]'"


def require_lm_eval() -> str:
    """lm-eval's version; a one-line error saying how to install it when it is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise DependencyError("lm-evaluation-harness is not installed; `eval` and `sweep` need "
                              f"it: {INSTALL}") from None
    return metadata.version("lm_eval")


def parse_tasks(text: str) -> tuple[str, ...]:
    """'gsm8k,arc_easy' → ('gsm8k', 'arc_easy'), as lm-eval's `--tasks` takes them."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ConfigError(f"--tasks {text!r}: expected task names separated by commas, e.g. "
                          "--tasks gsm8k,arc_easy")
    return names


@dataclass(frozen=True)
class EvalOptions:
    """What lm-eval is asked to run; validated before anything is loaded."""

    tasks: tuple[str, ...]
    limit: float | None = None
    batch_size: int | str = 1
    num_fewshot: int | None = None
    apply_chat_template: bool = False
    include_path: tuple[str, ...] = ()
    bootstrap_iters: int = 100000

    def __post_init__(self):
        if not self.tasks:
            raise ConfigError("--tasks: give at least one task, e.g. --tasks gsm8k")
        if self.limit is not None and not self.limit > 0:
            raise ConfigError(f"--limit {self.limit}: must be positive (a count, or a fraction "
                              "below 1)")
        if (isinstance(self.batch_size, str) and not self.batch_size.startswith("auto")) or (
                isinstance(self.batch_size, int) and self.batch_size < 1):
            raise ConfigError(f"--batch-size {self.batch_size!r}: expected a positive number or "
                              "auto")
        for p in self.include_path:
            if not Path(p).is_dir():
                raise ConfigError(f"--include-path {p}: not a folder; give the folder that "
                                  "holds your lm-eval task YAMLs")


@dataclass
class Tasks:
    """lm-eval's task manager and the requested tasks, built with their datasets loaded."""

    manager: object
    items: list = field(default_factory=list)  # lm-eval Task / Group objects, as requested


def _manager(include_path: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=defaults)


def _unknown(manager, names: tuple[str, ...]) -> list[str]:
    known = set(manager.all_tasks)
    return [n for n in names if n not in known and not Path(n).is_file()]


def load_tasks(options: EvalOptions) -> Tasks:
    """Resolve the task names and load their datasets (no model is touched).

    When every task is found in `--include-path`, lm-eval's ~15,000 built-in task YAMLs are not
    indexed (20-30 s); lm-eval itself gives the include path precedence over its own tasks."""
    require_lm_eval()
    manager = None
    if options.include_path:
        local = _manager(options.include_path, defaults=False)
        manager = None if _unknown(local, options.tasks) else local
    if manager is None:
        manager = _manager(options.include_path, defaults=True)
    unknown = _unknown(manager, options.tasks)
    if unknown:
        hints = [h for n in unknown for h in difflib.get_close_matches(n, manager.all_tasks, 2)]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ConfigError(f"--tasks: unknown lm-eval task {', '.join(map(repr, unknown))}{hint}; "
                          "list them with `lm-eval ls tasks`, or pass --include-path DIR with "
                          "your own task YAMLs")
    tasks = Tasks(manager)
    for name in options.tasks:
        tasks.items += _load_one(manager, name)
    return tasks


def _load_one(manager, name: str) -> list:
    from datasets.exceptions import DatasetNotFoundError

    try:
        loaded = manager.load([name])
    except (ConnectionError, DatasetNotFoundError) as e:
        offline = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                      for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        remedy = ("HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: run it once online to cache "
                  "the dataset, or point the task at local files (dataset_path: json)"
                  if offline else "check the network and the dataset's name")
        raise HubError(f"task {name}: its dataset could not be loaded "
                       f"({str(e).splitlines()[0]}); {remedy}") from None
    except FileNotFoundError as e:
        raise ConfigError(f"task {name}: a file of its dataset is missing ({e}); fix the "
                          "task YAML's dataset_kwargs / data_files") from None
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]]
    return list(loaded["tasks"].values())  # a tag: its tasks


def load_model(path: Path, device: torch.device, dtype: torch.dtype | str = "auto"):
    """(model, tokenizer) of a local checkpoint folder, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer


def harness_model(model, tokenizer, options: EvalOptions):
    """lm-eval's HFLM around a model we loaded (its weights may change between evaluations)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)


def run(lm, tasks: Tasks, options: EvalOptions) -> dict:
    """One lm-eval evaluation of `lm` on `tasks`: lm-eval's results dictionary."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks.items), task_manager=tasks.manager, limit=options.limit,
        num_fewshot=options.num_fewshot, apply_chat_template=options.apply_chat_template,
        bootstrap_iters=options.bootstrap_iters, log_samples=False)


def _canonical(obj):
    """A task config as plain data: functions by qualified name (no memory addresses)."""
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
    return str(obj)


def config_hash(config: dict) -> str:
    """sha256 (16 hex digits) of a task's resolved config, the metadata lm-eval adds left out."""
    config = {k: v for k, v in config.items() if k != "metadata"}
    text = json.dumps(_canonical(config), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def rows(results: dict) -> list[dict]:
    """One row per (task, metric, filter) of lm-eval's results, in the order it reports them."""
    out = []
    configs = results.get("configs", {})
    for task, metrics in results["results"].items():
        config = configs.get(task, {})
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in ("alias", "name", "sample_len", "sample_count") or \
                    metric.endswith("_stderr") or _number(value) is None:
                continue
            out.append({
                "task": task, "metric": metric, "filter": filt or None, "value": float(value),
                "stderr": _number(metrics.get(f"{metric}_stderr,{filt}" if filt else
                                              f"{metric}_stderr")),
                "n": n, "num_fewshot": results.get("n-shot", {}).get(task),
                "higher_is_better": results.get("higher_is_better", {}).get(task, {})
                .get(metric),
                "version": results.get("versions", {}).get(task),
                "dataset": {"path": config.get("dataset_path"),
                            "name": config.get("dataset_name"),
                            "split": config.get("test_split") or config.get("validation_split")},
                "config_hash": config_hash(config) if config else None})
    return out


def table(results: dict) -> str:
    """lm-eval's own Markdown table (and the groups table when there are groups)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def record(model: str, source: hub.Source, results_rows: list[dict], options: EvalOptions,
           seconds: float) -> dict:
    """The content of `eval.json`."""
    from .provenance import tool_version

    return {"model": model, "source": source.record(), "lm_eval_version": require_lm_eval(),
            "tasks": list(options.tasks), "limit": options.limit,
            "num_fewshot": options.num_fewshot, "batch_size": options.batch_size,
            "apply_chat_template": options.apply_chat_template, "results": results_rows,
            "tool": {"name": "mergekit-rl", "version": tool_version()},
            "seconds": round(seconds, 3)}


def evaluate(model: str, options: EvalOptions, out: Path | None, device: str = "auto",
             update_card: bool = False, overwrite: bool = False) -> tuple[dict, str]:
    """Run lm-eval on MODEL (a local folder or a Hub id): (the eval.json record, the table).
    MODEL is only read, except that `update_card` adds the results to its README.md."""
    from .engine import resolve_device
    from .output import atomic_folder, check_output
    from .provenance import update_card_file

    local = hub.local_path(model)
    if update_card and local is None:
        raise ConfigError(f"--update-card: {model} is a Hub id; it needs a local folder (for a "
                          "Hub repo, `push FOLDER REPO --eval OUT/eval.json`)")
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if out is not None:
        out = check_output(Path(out), hub.local_inputs(model), overwrite)
    tasks = load_tasks(options)  # unknown task, offline dataset: before the model loads
    source = hub.resolve(model)
    start = time.perf_counter()
    net, tokenizer = load_model(source.path, dev)
    results = run(harness_model(net, tokenizer, options), tasks, options)
    rec = record(model, source, rows(results), options, time.perf_counter() - start)
    if out is not None:
        with atomic_folder(out) as tmp:
            (tmp / EVAL_NAME).write_text(json.dumps(rec, indent=2) + "\n")
    if update_card:
        update_card_file(source.path, rec)
    return rec, table(results)


def read_record(path: Path) -> dict:
    """An `eval.json` written by `eval` (for `push --eval`); a one-line error otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); give the eval.json `mergekit-rl eval "
                          "-o OUT` wrote") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ConfigError(f"{path}: no `results` list; give the eval.json `mergekit-rl eval -o "
                          "OUT` wrote")
    return data
