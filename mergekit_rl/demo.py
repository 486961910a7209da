"""`mergekit-rl demo`: the reasoning-vector experiment in miniature, end to end on a CPU.

Every stage runs through the project's own tools, with configs written to `OUT/configs/` so any
stage can be rerun by hand (`mergekit-rl train sft OUT/configs/sft.yaml`):

  data       generated word problems (`#### N`) and word-list instructions, train / test splits;
             `flawed_share` of the worked solutions stop one step short (mixed-quality data)
  base       a byte-level BPE tokenizer and a tiny Qwen2 pretrained from scratch on both families
  sft        `train sft` from the base on word problems                    (the SFT donor)
  grpo       `train grpo` from SFT with the exact-answer reward            (the GRPO donor)
  instruct   `train sft` from the base on instructions                      (the sibling)
  vector     `extract grpo sft`, `add instruct v`, `subtract instruct v`, and `merge` of the
             manifest `instruct + 1.0·(grpo − sft)` (one pass, no vector on disk)
  pairs      `sample pairs` from SFT (chosen = correct, rejected = wrong)
  wpo / dpo  `train wpo` from SFT on those pairs, weighting on / off
  eval       greedy exact match on held-out items; report.json, report.png, the table

Stages are recorded in `OUT/stages.json` with the recipe's fingerprint: a rerun reuses finished
stages of the same recipe, redoes a stage (and everything after it) whose recipe changed, and
`fresh` starts again. The numbers are whatever the run measures; the goals in `GOALS` are
checked and reported, never enforced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    threads: int = 1  # tiny matrices: one thread beats two on a shared 2-core machine
    # tasks
    min_steps: int = 1
    max_steps: int = 3
    max_start: int = 30
    max_operand: int = 15
    max_total: int = 50
    bags: bool = False
    flawed_share: float = 0.5  # worked solutions that stop one step short (mixed-quality data)
    min_words: int = 3
    max_words: int = 4
    n_test: int = 1000  # held-out items per task (one accuracy: ±1.5 points standard error)
    # tokenizer and model (Qwen2 architecture, tied embeddings like Qwen2.5-0.5B/1.5B)
    vocab_size: int = 400
    hidden: int = 96
    intermediate: int = 256
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    # pretraining the base on both families (loss on every token)
    pretrain_docs: int = 20000
    pretrain_share: float = 0.5  # word problems' share of the documents
    pretrain_steps: int = 1500
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    # SFT donor (word problems)
    sft_train: int = 2000
    sft_steps: int = 60
    sft_batch: int = 32
    sft_lr: float = 1e-4
    # GRPO donor (from SFT)
    grpo_steps: int = 120
    grpo_prompts: int = 16
    grpo_group: int = 8
    grpo_temperature: float = 1.0
    grpo_lr: float = 3e-5  # 1e-4 stayed flat, 3e-4 collapsed
    grpo_beta: float = 0.0
    max_new_tokens: int = 40
    # instruct sibling (from the base; optionally keeps some word problems in its mix)
    instruct_train: int = 2000
    instruct_steps: int = 60
    instruct_batch: int = 32
    instruct_lr: float = 1e-4
    instruct_arith_share: float = 0.2
    # vector arithmetic
    alpha: float = 1.0
    # preference pairs and WPO / DPO (from SFT)
    pairs_prompts: int = 512
    pairs_samples: int = 4
    wpo_steps: int = 60
    wpo_batch: int = 16
    wpo_lr: float = 1e-5
    wpo_beta: float = 0.1

    def __post_init__(self):
        try:  # the task specs check their own fields: fail here, before any work
            self.arithmetic_spec(), self.instruction_spec()
        except ValueError as e:
            raise ConfigError(f"demo recipe: {e}; fix the --set value") from None

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True)
                              .encode()).hexdigest()[:16]

    def arithmetic_spec(self):
        from trainers.tasks import ArithmeticSpec

        return ArithmeticSpec(self.min_steps, self.max_steps, self.max_start, self.max_operand,
                              self.max_total, self.bags, self.flawed_share)

    def instruction_spec(self):
        from trainers.tasks import InstructionSpec

        return InstructionSpec(self.min_words, self.max_words)


QUICK = dict(n_test=200, pretrain_docs=3000, pretrain_steps=80, pretrain_batch=32, hidden=64,
             intermediate=128, layers=2, sft_train=400, sft_steps=10, sft_batch=16,
             grpo_steps=4, grpo_prompts=8, grpo_group=4, max_new_tokens=40, instruct_train=400,
             instruct_steps=10, instruct_batch=16, pairs_prompts=32, pairs_samples=4, wpo_steps=4,
             wpo_batch=8)

# (row name, task) pairs evaluated; the instruction task only where the question is asked
ROWS = (("base", "arithmetic"), ("sft", "arithmetic"), ("grpo", "arithmetic"),
        ("instruct", "arithmetic"), ("instruct+v", "arithmetic"), ("instruct-v", "arithmetic"),
        ("merge", "arithmetic"), ("wpo", "arithmetic"), ("dpo", "arithmetic"),
        ("instruct", "instruction"), ("instruct+v", "instruction"))

# what the recipe aims for (points of accuracy); reported, never enforced
GOALS = (("grpo beats sft by >= 5 points", "grpo", "sft", 5.0),
         ("instruct+v beats instruct by >= 5 points", "instruct+v", "instruct", 5.0),
         ("instruct-v is below instruct", "instruct", "instruct-v", 1e-9),
         ("wpo >= dpo", "wpo", "dpo", 0.0))

MODEL_DIRS = {"base": "models/base", "sft": "models/sft", "grpo": "models/grpo",
              "instruct": "models/instruct", "instruct+v": "models/instruct_plus_v",
              "instruct-v": "models/instruct_minus_v", "merge": "models/merge",
              "wpo": "models/wpo", "dpo": "models/dpo"}


def make_recipe(quick: bool = False, overrides: tuple[str, ...] = ()) -> Recipe:
    """The default (or `--quick`) recipe with `key=value` overrides; errors name the key."""
    values = dict(QUICK) if quick else {}
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ConfigError(f"--set {item!r}: expected key=value with key one of "
                              f"{', '.join(fields)}")
        kind = type(fields[key].default)
        try:
            values[key] = (text.strip().lower() in ("1", "true", "yes")) if kind is bool \
                else kind(text)
        except ValueError:
            raise ConfigError(f"--set {key}: {text!r} is not a {kind.__name__}") from None
    return Recipe(**values)


# ---------------------------------------------------------------------------------------------
# Stages

# What each stage reads: the stages it builds on and the recipe fields it uses. A stage is
# redone when its own fields or anything upstream changed, and reused otherwise.
TASK_FIELDS = ("seed", "min_steps", "max_steps", "max_start", "max_operand", "max_total", "bags",
               "flawed_share", "min_words", "max_words", "n_test", "sft_train", "grpo_prompts",
               "pairs_prompts", "instruct_train", "instruct_arith_share", "pretrain_docs",
               "pretrain_share")
DEPENDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "data": ((), TASK_FIELDS),
    "base": (("data",), ("vocab_size", "hidden", "intermediate", "layers", "heads", "kv_heads",
                         "pretrain_steps", "pretrain_batch", "pretrain_lr")),
    "sft": (("base",), ("sft_steps", "sft_batch", "sft_lr")),
    "grpo": (("sft",), ("grpo_steps", "grpo_prompts", "grpo_group", "grpo_temperature",
                        "grpo_lr", "grpo_beta", "max_new_tokens")),
    "instruct": (("base",), ("instruct_steps", "instruct_batch", "instruct_lr")),
    "vector": (("grpo", "instruct"), ("alpha",)),
    "pairs": (("sft",), ("pairs_samples", "max_new_tokens")),
    "wpo": (("pairs",), ("wpo_steps", "wpo_batch", "wpo_lr", "wpo_beta")),
    "dpo": (("pairs",), ("wpo_steps", "wpo_batch", "wpo_lr", "wpo_beta")),
}
EVAL_FROM = {"base": "base", "sft": "sft", "grpo": "grpo", "instruct": "instruct",
             "instruct+v": "vector", "instruct-v": "vector", "merge": "vector", "wpo": "wpo",
             "dpo": "dpo"}


class Stages:
    """Runs named stages in order, reusing those finished before with the same inputs."""

    def __init__(self, out: Path, recipe: Recipe):
        self.out, self.recipe = out, recipe
        self.file = out / "stages.json"
        self.done = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.fingerprints: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def fingerprint(self, name: str, deps: tuple[str, ...], fields: tuple[str, ...]) -> str:
        values = {f: getattr(self.recipe, f) for f in fields}
        text = json.dumps([name, values, [self.fingerprints[d] for d in deps]], sort_keys=True)
        self.fingerprints[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self.fingerprints[name]

    def run(self, name: str, outputs: list[str], fn: Callable[[], str | None],
            depends: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> str:
        deps, fields = depends or DEPENDS[name]
        fingerprint = self.fingerprint(name, deps, fields)
        record = self.done.get(name)
        if (record and record["recipe"] == fingerprint
                and all((self.out / p).exists() for p in outputs)):
            self.seconds[name] = record["seconds"]
            return f"[{name}] reused ({record['seconds']:.0f}s when run)"
        self.done.pop(name, None)
        self._save()
        for p in outputs:  # a half-written output of a killed run
            target = self.out / p
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        from trainers.errors import TrainerError

        t0 = time.perf_counter()
        try:
            summary = fn()
        except TrainerError as e:  # a bad --set value or an interrupted trainer: one line
            raise ConfigError(f"demo stage {name} ({self.out}): {e}") from None
        seconds = time.perf_counter() - t0
        self.seconds[name] = seconds
        self.done[name] = {"recipe": fingerprint, "seconds": seconds}
        self._save()
        return f"[{name}] {summary or 'done'} ({seconds:.0f}s)"

    def _save(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1))
        tmp.replace(self.file)


def _write_config(out: Path, name: str, config: dict) -> Path:
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _train(kind: str, config_path: Path) -> Path:
    """Run a bundled trainer on a written config, exactly as `mergekit-rl train KIND` does."""
    from trainers.config import load_config

    if kind == "sft":
        from trainers.sft import SFTConfig, train_sft
        return train_sft(load_config(SFTConfig, config_path))
    if kind == "grpo":
        from trainers.grpo import GRPOConfig, train_grpo
        return train_grpo(load_config(GRPOConfig, config_path))
    from trainers.wpo import WPOConfig, train_wpo
    return train_wpo(load_config(WPOConfig, config_path))


def _train_section(out: Path, name: str, batch: int, steps: int, seed: int, micro: int,
                   quiet: bool) -> dict:
    return {"output_dir": str(out / "models" / name), "batch_size": batch,
            "micro_batch_size": micro, "max_steps": steps, "seed": seed, "log_steps": 10,
            "report_to": ["none"], "progress_bar": not quiet, "overwrite_output_dir": True,
            "save_total_limit": 1}


# ---------------------------------------------------------------------------------------------
# The experiment

def run_demo(out: Path, quick: bool = False, fresh: bool = False, overrides: tuple[str, ...] = (),
             quiet: bool = False) -> Iterator[str]:
    """Run (or resume) the experiment in `out`, yielding one line per finished stage and the
    report table at the end."""
    import torch
    from transformers.utils import logging as hf_logging

    from trainers import tasks

    recipe = make_recipe(quick, overrides)
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / "stages.json").exists():
        raise ConfigError(f"{out}: exists and is not a demo folder (no stages.json); nothing "
                          "was touched. Choose a new or empty folder with -o")
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(recipe.threads)
    stages = Stages(out, recipe)
    r = recipe
    arith, instr = r.arithmetic_spec(), r.instruction_spec()
    data = out / "data"
    yield (f"mergekit-rl demo: recipe {r.fingerprint()}{' (quick)' if quick else ''} in {out}; "
           f"torch threads {r.threads}")

    # -- data ------------------------------------------------------------------------------
    def make_data() -> str:
        a = tasks.make_split(tasks.ARITHMETIC, max(r.sft_train, r.grpo_prompts, r.pairs_prompts),
                             r.n_test, r.seed, arithmetic=arith)
        i = tasks.make_split(tasks.INSTRUCTION, r.instruct_train, r.n_test, r.seed,
                             instruction=instr)
        docs = tasks.pretraining_corpus(r.pretrain_docs, r.seed,
                                        arithmetic_share=r.pretrain_share,
                                        exclude=[e.prompt for e in a.test + i.test],
                                        arithmetic=arith, instruction=instr)
        tasks.write_jsonl(a.train[:r.sft_train], data / "arithmetic_train.jsonl")
        tasks.write_jsonl(a.test, data / "arithmetic_test.jsonl")
        tasks.write_jsonl(i.test, data / "instruction_test.jsonl")
        n_arith = round(r.instruct_train * r.instruct_arith_share)
        mix = i.train[:r.instruct_train - n_arith] + a.train[len(a.train) - n_arith:]
        random.Random(r.seed).shuffle(mix)
        tasks.write_jsonl(mix, data / "instruction_train.jsonl")
        with (data / "pretrain.jsonl").open("w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"prompt": "", "completion": doc}) + "\n")
        return (f"{len(a.train[:r.sft_train])} word problems + {len(mix)} instructions to train "
                f"on, {len(a.test)} + {len(i.test)} held out, {len(docs)} pretraining documents")

    yield stages.run("data", ["data"], make_data)

    # -- base ------------------------------------------------------------------------------
    def make_base() -> str:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from .tiny import build_tokenizer

        docs = [json.loads(line)["completion"]
                for line in (data / "pretrain.jsonl").read_text().splitlines()[:5000]]
        init = out / "models" / "init"
        tokenizer = build_tokenizer(init, corpus=docs, vocab_size=r.vocab_size)
        im_end = tokenizer.convert_tokens_to_ids(tasks.IM_END)
        torch.manual_seed(r.seed)
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=r.hidden,
                             intermediate_size=r.intermediate, num_hidden_layers=r.layers,
                             num_attention_heads=r.heads, num_key_value_heads=r.kv_heads,
                             max_position_embeddings=512, tie_word_embeddings=True,
                             bos_token_id=tokenizer.pad_token_id, eos_token_id=im_end,
                             pad_token_id=tokenizer.pad_token_id)
        model = Qwen2ForCausalLM(config)
        model.generation_config.eos_token_id = [im_end, tokenizer.eos_token_id]
        model.save_pretrained(init)
        params = sum(p.numel() for p in model.parameters())
        cfg = _write_config(out, "pretrain", {
            "model": {"path": str(init)},
            "data": {"path": str(data / "pretrain.jsonl"), "chat": False},
            "train": _train_section(out, "base", r.pretrain_batch, r.pretrain_steps, r.seed,
                                    r.pretrain_batch, quiet),
            "optim": {"lr": r.pretrain_lr, "scheduler": "cosine", "warmup_ratio": 0.05,
                      "betas": [0.9, 0.99]},
            "sft": {"max_length": 256}})
        _train("sft", cfg)
        return (f"tokenizer of {len(tokenizer)} tokens; Qwen2 with {params / 1e6:.2f} M "
                f"parameters pretrained {r.pretrain_steps} steps ({cfg.relative_to(out)})")

    yield stages.run("base", ["models/base"], make_base)

    # -- donors and sibling ----------------------------------------------------------------
    def sft_stage(name: str, start: str, data_file: str, steps: int, batch: int, lr: float):
        def fn() -> str:
            cfg = _write_config(out, name, {
                "model": {"path": str(out / "models" / start)},
                "data": {"path": str(data / data_file)},
                "train": _train_section(out, name, batch, steps, r.seed, batch, quiet),
                "optim": {"lr": lr, "scheduler": "cosine", "warmup_ratio": 0.1},
                "sft": {"max_length": 256}})
            _train("sft", cfg)
            return f"train sft {cfg.relative_to(out)}: {steps} steps from {start}"
        return fn

    yield stages.run("sft", ["models/sft"], sft_stage(
        "sft", "base", "arithmetic_train.jsonl", r.sft_steps, r.sft_batch, r.sft_lr))

    def make_grpo() -> str:
        batch = r.grpo_prompts * r.grpo_group
        cfg = _write_config(out, "grpo", {
            "model": {"path": str(out / "models" / "sft")},
            "data": {"path": str(data / "arithmetic_train.jsonl")},
            "train": _train_section(out, "grpo", batch, r.grpo_steps, r.seed, batch, quiet),
            "optim": {"lr": r.grpo_lr},
            "grpo": {"rewards": ["exact_answer"], "num_generations": r.grpo_group,
                     "max_prompt_length": 192, "max_completion_length": r.max_new_tokens,
                     "temperature": r.grpo_temperature, "beta": r.grpo_beta,
                     "loss_type": "grpo", "scale_rewards": "group"}})
        _train("grpo", cfg)
        rewards = _logged(out / "models" / "grpo", "reward")
        return (f"train grpo {cfg.relative_to(out)}: {r.grpo_steps} steps, reward "
                f"{_mean(rewards[:3]):.2f} -> {_mean(rewards[-3:]):.2f}")

    yield stages.run("grpo", ["models/grpo"], make_grpo)
    yield stages.run("instruct", ["models/instruct"], sft_stage(
        "instruct", "base", "instruction_train.jsonl", r.instruct_steps, r.instruct_batch,
        r.instruct_lr))

    # -- weight arithmetic -----------------------------------------------------------------
    def make_vectors() -> str:
        from . import manifest, merge
        from .operations import Options, apply, extract

        models = out / "models"
        opts = Options(overwrite=True, command="mergekit-rl demo")
        extract(str(models / "grpo"), str(models / "sft"), out / "vector", opts)
        apply(str(models / "instruct"), str(out / "vector"), models / "instruct_plus_v",
              r.alpha, opts)
        apply(str(models / "instruct"), str(out / "vector"), models / "instruct_minus_v",
              r.alpha, opts, subtract=True)
        path = out / "configs" / "merge.yaml"
        path.write_text(yaml.safe_dump({
            "output": {"path": "../models/merge"}, "target": "../models/instruct",
            "method": "task_arithmetic",
            "terms": [{"plus": "../models/grpo", "minus": "../models/sft",
                       "weight": r.alpha}]}, sort_keys=False))
        merge.run_merge(manifest.load(path), None, opts)
        diff = _max_difference(models / "merge", models / "instruct_plus_v")
        return (f"extract grpo sft -> vector; add / subtract (alpha {r.alpha:g}); merge "
                f"{path.relative_to(out)}: max |merge - add| = {diff:.2g}")

    yield stages.run("vector", ["vector", "models/instruct_plus_v", "models/instruct_minus_v",
                                "models/merge"], make_vectors)

    # -- preference pairs, WPO and DPO -----------------------------------------------------
    def make_pairs() -> str:
        from trainers.sampling import SamplePairsConfig, load_sample_config, sample_pairs

        cfg = _write_config(out, "pairs", {
            "model": {"path": str(out / "models" / "sft")},
            "data": {"path": str(data / "arithmetic_train.jsonl"),
                     "max_examples": r.pairs_prompts},
            "reward": {"function": "exact_answer"},
            "output": str(data / "pairs.jsonl"),
            "generation": {"num_samples": r.pairs_samples, "max_prompt_length": 192,
                           "max_completion_length": r.max_new_tokens, "temperature": 1.0},
            # hybrid (WPO's best setting): the worked solution joins the policy's samples
            "pairs": {"mode": "hybrid", "off_policy_fields": ["completion"],
                      "rejected": "lowest"},
            "seed": r.seed, "overwrite": True})
        sample_pairs(load_sample_config(SamplePairsConfig, cfg))
        n = len((data / "pairs.jsonl").read_text().splitlines())
        if n < r.wpo_batch:
            raise ConfigError(f"sample pairs gave {n} pairs, fewer than wpo_batch {r.wpo_batch}:"
                              " raise pairs_prompts or pairs_samples")
        return f"sample pairs {cfg.relative_to(out)}: {n} (better, worse) pairs"

    yield stages.run("pairs", ["data/pairs.jsonl"], make_pairs)

    def pref_stage(name: str, weighting: bool):
        def fn() -> str:
            cfg = _write_config(out, name, {
                "model": {"path": str(out / "models" / "sft")},
                "data": {"path": str(data / "pairs.jsonl")},
                "train": _train_section(out, name, r.wpo_batch, r.wpo_steps, r.seed,
                                        r.wpo_batch, quiet),
                "optim": {"lr": r.wpo_lr, "scheduler": "cosine", "warmup_ratio": 0.1},
                "wpo": {"loss_type": "sigmoid", "beta": r.wpo_beta, "weighting": weighting,
                        "max_length": 256, "max_prompt_length": 192}})
            _train("wpo", cfg)
            acc = _logged(out / "models" / name, "rewards/accuracies")
            return (f"train wpo {cfg.relative_to(out)} (weighting {'on' if weighting else 'off'})"
                    f": {r.wpo_steps} steps, reward accuracy {_mean(acc[-3:]):.2f}")
        return fn

    yield stages.run("wpo", ["models/wpo"], pref_stage("wpo", True))
    yield stages.run("dpo", ["models/dpo"], pref_stage("dpo", False))

    # -- evaluation and report -------------------------------------------------------------
    from trainers.evaluate import evaluate

    tests = {t: [tasks.Example(**json.loads(line))
                 for line in (data / f"{t}_test.jsonl").read_text().splitlines()]
             for t in ("arithmetic", "instruction")}
    results: dict[str, dict[str, dict]] = {}
    for name, task in ROWS:
        key = f"eval {name} {task}"
        file = out / "eval" / f"{MODEL_DIRS[name].split('/')[-1]}.{task}.json"

        def fn(name=name, task=task, file=file) -> str:
            result = evaluate(out / MODEL_DIRS[name], tests[task], r.max_new_tokens)
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(result, indent=1))
            return f"{100 * result['accuracy']:.1f}% of {result['n']}"

        yield stages.run(key, [str(file.relative_to(out))], fn,
                         ((EVAL_FROM[name],), ("n_test", "max_new_tokens")))
        results.setdefault(name, {})[task] = json.loads(file.read_text())

    report = build_report(out, r, quick, results, stages.seconds)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    png = plot_report(report, out / "report.png")
    yield from format_report(report)
    yield f"report: {out / 'report.json'}" + (f", {png}" if png else
                                               " (report.png needs matplotlib: pip install "
                                               "'mergekit-rl[plot]')")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _logged(run_dir: Path, key: str) -> list[float]:
    """Values of `key` in a finished trainer run's metrics.jsonl."""
    from trainers.metrics import read_metrics

    return [float(row[key]) for row in read_metrics(run_dir) if key in row]


def _max_difference(a: Path, b: Path) -> float:
    from .checkpoint import Checkpoint

    worst = 0.0
    with Checkpoint.open(a) as x, Checkpoint.open(b) as y:
        for name in x.tensors:
            worst = max(worst, float((x.read(name).float() - y.read(name).float()).abs().max()))
    return worst


def build_report(out: Path, r: Recipe, quick: bool, results: dict, seconds: dict) -> dict:
    from .inspection import inspect_checkpoint

    def acc(name: str, task: str = "arithmetic") -> float:
        return 100 * results[name][task]["accuracy"]

    vector = inspect_checkpoint(str(out / "vector"))

    def complete(name: str, task: str) -> float | None:
        share = results[name][task].get("complete")  # word problems only
        return None if share is None else 100 * share

    rows = [{"model": name, "task": task, "accuracy": acc(name, task),
             "complete": complete(name, task), "n": results[name][task]["n"],
             "path": MODEL_DIRS[name]} for name, task in ROWS]
    goals = [{"goal": text, "difference": acc(a) - acc(b), "met": acc(a) - acc(b) >= need}
             for text, a, b, need in GOALS]
    return {"recipe": dataclasses.asdict(r), "fingerprint": r.fingerprint(), "quick": quick,
            "rows": rows, "goals": goals,
            "instruction_change": acc("instruct+v", "instruction") - acc("instruct",
                                                                         "instruction"),
            "vector": {"l2": vector.total.l2, "sparsity": vector.total.sparsity,
                       "groups": [g.as_dict() for g in vector.groups]},
            "seconds": seconds, "total_seconds": sum(seconds.values())}


def format_report(report: dict) -> Iterator[str]:
    n = report["rows"][0]["n"]
    yield ""
    yield (f"{'model':<14}{'word problems':>15}{'(complete)':>12}{'instructions':>15}   "
           f"(greedy exact match, %, n={n})")
    by_model: dict[str, dict[str, dict]] = {}
    for row in report["rows"]:
        by_model.setdefault(row["model"], {})[row["task"]] = row

    def cell(value: float | None, width: int, fmt: str = "{:.1f}") -> str:
        return f"{'' if value is None else fmt.format(value):>{width}}"

    for model, rows in by_model.items():
        arith, instr = rows["arithmetic"], rows.get("instruction", {})
        yield (f"{model:<14}{cell(arith['accuracy'], 15)}"
               f"{cell(arith.get('complete'), 12, '({:.1f})')}{cell(instr.get('accuracy'), 15)}")
    yield ""
    for goal in report["goals"]:
        yield (f"{'met    ' if goal['met'] else 'NOT met'}  {goal['goal']}: "
               f"{goal['difference']:+.1f} points")
    yield (f"instruct+v vs instruct on instructions: {report['instruction_change']:+.1f} points; "
           f"vector L2 {report['vector']['l2']:.3g}; total {report['total_seconds']:.0f}s")


def plot_report(report: dict, path: Path) -> Path | None:
    """Bar chart of accuracies and the vector's per-layer L2 norms; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5),
                                      gridspec_kw={"width_ratios": [3, 2]})
    rows = report["rows"]
    labels = [row["model"] + ("\n(instr.)" if row["task"] == "instruction" else "")
              for row in rows]
    colors = ["tab:blue" if row["task"] == "arithmetic" else "tab:orange" for row in rows]
    bars = left.bar(range(len(rows)), [row["accuracy"] for row in rows], color=colors)
    left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    left.set_ylabel("exact match (%)")
    left.set_title("held-out accuracy (blue: word problems, orange: instructions)")
    groups = report["vector"]["groups"]
    right.bar(range(len(groups)), [g["l2_norm"] for g in groups], color="tab:green")
    right.set_xticks(range(len(groups)), [g["group"] for g in groups], rotation=45, ha="right",
                     fontsize=8)
    right.set_ylabel("L2 norm")
    right.set_title("reasoning vector (grpo - sft) per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
