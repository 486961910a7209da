"""The demo's stages, each through the project's own tools with its config written to
`OUT/configs/` (so `mergekit-rl train sft OUT/configs/sft.yaml` reruns it by hand), and the
bookkeeping that reuses finished stages.

A stage is a function of the run's `Context` that returns its one-line summary. `DEPENDS` says
what each stage reads: the stages it builds on and the recipe fields it uses. A stage is redone
when its own fields or anything upstream changed, and reused otherwise.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergekit_rl.errors import ConfigError, Interrupted, MergekitRLError

from . import tasks
from .recipe import Recipe

TASK_FIELDS = ("seed", "min_steps", "max_steps", "max_start", "max_operand", "max_total", "bags",
               "flawed_share", "min_words", "max_words", "n_test", "sft_train", "grpo_prompts",
               "pairs_prompts", "instruct_train", "instruct_arith_share", "pretrain_docs",
               "pretrain_share")
DEPENDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "data": ((), TASK_FIELDS),
    "base": (("data",), ("vocab_size", "hidden", "intermediate", "layers", "heads", "kv_heads",
                         "pretrain_steps", "pretrain_batch", "pretrain_lr",
                         "pretrain_micro_batch", "pretrain_threads")),
    "sft": (("base",), ("sft_steps", "sft_batch", "sft_lr")),
    "grpo": (("sft",), ("grpo_steps", "grpo_prompts", "grpo_group", "grpo_temperature",
                        "grpo_lr", "grpo_beta", "max_new_tokens")),
    "instruct": (("base",), ("instruct_steps", "instruct_batch", "instruct_lr")),
    "vector": (("grpo", "instruct"), ("alpha",)),
    "sweep": (("vector",), ("sweep_alphas", "sweep_items", "n_test", "max_new_tokens")),
    "pairs": (("sft",), ("pairs_samples", "max_new_tokens")),
    "wpo": (("pairs",), ("wpo_steps", "wpo_batch", "wpo_lr", "wpo_beta")),
    "dpo": (("pairs",), ("wpo_steps", "wpo_batch", "wpo_lr", "wpo_beta")),
    "judge": (("pairs",), ("judge_steps", "judge_batch", "judge_lr")),
    "pairwise": (("judge",), ("pairwise_steps", "pairwise_prompts", "pairwise_group",
                              "pairwise_lr", "grpo_temperature", "max_new_tokens")),
    "vector_pairwise": (("pairwise", "instruct"), ("alpha",)),
    "judged": (("pairwise", "grpo"), ("n_test", "max_new_tokens")),
}


@dataclass(frozen=True)
class Context:
    """What every stage needs: the output folder, the recipe, and whether to show progress."""

    out: Path
    recipe: Recipe
    quiet: bool

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def models(self) -> Path:
        return self.out / "models"


class Stages:
    """The record of finished stages (`stages.json`): which can be reused (same inputs, outputs
    there), clearing one before it runs, recording it after; `runner` runs them."""

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

    def reusable(self, name: str, outputs: list[str], fingerprint: str) -> bool:
        """Finished before with the same inputs, and its outputs are there."""
        record = self.done.get(name)
        if record and record["recipe"] == fingerprint and \
                all((self.out / p).exists() for p in outputs):
            self.seconds[name] = record["seconds"]
            return True
        return False

    def reused_line(self, name: str) -> str:
        return f"[{name}] reused ({self.done[name]['seconds']:.0f}s when run)"

    def prepare(self, name: str, outputs: list[str]) -> None:
        """Forget the stage's old record and remove what a killed run half-wrote."""
        self.done.pop(name, None)
        self._save()
        for p in outputs:
            target = self.out / p
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def outcome(self, name: str, get: Callable[[], tuple]):
        """`get()`, with a bad --set value or a tool's refusal turned into one line naming the
        stage; an interruption and a bug pass unchanged."""
        try:
            return get()
        except Interrupted:
            raise
        except MergekitRLError as e:
            raise ConfigError(f"demo stage {name} ({self.out}): {e}") from None

    def record(self, name: str, fingerprint: str, seconds: float) -> None:
        self.seconds[name] = seconds
        self.done[name] = {"recipe": fingerprint, "seconds": seconds}
        self._save()

    @staticmethod
    def done_line(name: str, summary: str | None, seconds: float) -> str:
        return f"[{name}] {summary or 'done'} ({seconds:.0f}s)"

    def _save(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1))
        tmp.replace(self.file)


# ---------------------------------------------------------------------------------------------
# Running the bundled tools on written configs

def write_config(ctx: Context, name: str, config: dict) -> Path:
    path = ctx.out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_tool(kind: str, config_path: Path) -> Path:
    """Run a bundled trainer or sampler on a written config, as `mergekit-rl train KIND` does."""
    from trainers import registry

    return registry.run(kind, registry.load(kind, config_path))


def train_section(ctx: Context, name: str, batch: int, steps: int) -> dict:
    return {"output_dir": str(ctx.models / name), "batch_size": batch,
            "micro_batch_size": batch, "max_steps": steps, "seed": ctx.recipe.seed,
            "log_steps": 10, "report_to": ["none"], "progress_bar": not ctx.quiet,
            "overwrite_output_dir": True, "save_total_limit": 1,
            "num_threads": ctx.recipe.threads,  # a hand rerun of the config computes the same
            "cpu_malloc": "cached"}  # tiny models: half their step time was page faults


def logged(run_dir: Path, key: str) -> list[float]:
    """Values of `key` in a finished trainer run's metrics.jsonl."""
    from trainers.metrics import read_metrics

    return [float(row[key]) for row in read_metrics(run_dir) if key in row]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# The stages

def make_data(ctx: Context) -> str:
    r, data = ctx.recipe, ctx.data
    arith, instr = r.arithmetic_spec(), r.instruction_spec()
    a = tasks.make_split(tasks.ARITHMETIC, max(r.sft_train, r.grpo_prompts, r.pairs_prompts),
                         r.n_test, r.seed, arithmetic=arith)
    i = tasks.make_split(tasks.INSTRUCTION, r.instruct_train, r.n_test, r.seed, instruction=instr)
    docs = tasks.pretraining_corpus(r.pretrain_docs, r.seed, arithmetic_share=r.pretrain_share,
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
    return (f"{len(a.train[:r.sft_train])} word problems + {len(mix)} instructions to train on, "
            f"{len(a.test)} + {len(i.test)} held out, {len(docs)} pretraining documents")


def make_base(ctx: Context) -> str:
    """A tokenizer trained on the corpus, a tiny Qwen2 (tied embeddings), pretrained on it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from .tiny import build_tokenizer

    r = ctx.recipe
    docs = [json.loads(line)["completion"]
            for line in (ctx.data / "pretrain.jsonl").read_text().splitlines()[:5000]]
    init = ctx.models / "init"
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
    cfg = write_config(ctx, "pretrain", {
        "model": {"path": str(init)},
        "data": {"path": str(ctx.data / "pretrain.jsonl"), "chat": False},
        "train": {**train_section(ctx, "base", r.pretrain_batch, r.pretrain_steps),
                  "micro_batch_size": min(r.pretrain_micro_batch, r.pretrain_batch),
                  "sort_by_length": True, "num_threads": r.pretrain_threads},
        "optim": {"lr": r.pretrain_lr, "scheduler": "cosine", "warmup_ratio": 0.05,
                  "betas": [0.9, 0.99]},
        "sft": {"max_length": 256}})
    try:
        run_tool("sft", cfg)
    finally:  # the process's later stages keep the recipe's threads
        torch.set_num_threads(r.threads)
    return (f"tokenizer of {len(tokenizer)} tokens; Qwen2 with {params / 1e6:.2f} M parameters "
            f"pretrained {r.pretrain_steps} steps ({cfg.relative_to(ctx.out)})")


def sft_stage(name: str, start: str, data_file: str, steps: str, batch: str, lr: str):
    """`train sft` from `start` on a data file; `steps`, `batch`, `lr` name recipe fields."""
    def fn(ctx: Context) -> str:
        r = ctx.recipe
        cfg = write_config(ctx, name, {
            "model": {"path": str(ctx.models / start)},
            "data": {"path": str(ctx.data / data_file)},
            "train": train_section(ctx, name, getattr(r, batch), getattr(r, steps)),
            "optim": {"lr": getattr(r, lr), "scheduler": "cosine", "warmup_ratio": 0.1},
            "sft": {"max_length": 256}})
        run_tool("sft", cfg)
        return f"train sft {cfg.relative_to(ctx.out)}: {getattr(r, steps)} steps from {start}"
    return fn


def make_grpo(ctx: Context) -> str:
    r = ctx.recipe
    batch = r.grpo_prompts * r.grpo_group
    cfg = write_config(ctx, "grpo", {
        "model": {"path": str(ctx.models / "sft")},
        "data": {"path": str(ctx.data / "arithmetic_train.jsonl")},
        "train": train_section(ctx, "grpo", batch, r.grpo_steps),
        "optim": {"lr": r.grpo_lr},
        "grpo": {"rewards": ["exact_answer"], "num_generations": r.grpo_group,
                 "max_prompt_length": 192, "max_completion_length": r.max_new_tokens,
                 "temperature": r.grpo_temperature, "beta": r.grpo_beta,
                 "loss_type": "grpo", "scale_rewards": "group",
                 # the process's RNG stream, as when the README's figures were measured
                 "sample_seeding": "global"}})
    run_tool("grpo", cfg)
    rewards = logged(ctx.models / "grpo", "reward")
    return (f"train grpo {cfg.relative_to(ctx.out)}: {r.grpo_steps} steps, reward "
            f"{mean(rewards[:3]):.2f} -> {mean(rewards[-3:]):.2f}")


def make_vectors(ctx: Context) -> str:
    """`extract grpo sft`, `add` / `subtract` it on the sibling, and the one-pass `merge`."""
    from mergekit_rl import manifest, merge
    from mergekit_rl.job import Options
    from mergekit_rl.vectors import apply, extract

    r, models = ctx.recipe, ctx.models
    opts = Options(overwrite=True, command="mergekit-rl demo")
    extract(str(models / "grpo"), str(models / "sft"), ctx.out / "vector", opts)
    apply(str(models / "instruct"), str(ctx.out / "vector"), models / "instruct_plus_v",
          r.alpha, opts)
    apply(str(models / "instruct"), str(ctx.out / "vector"), models / "instruct_minus_v",
          r.alpha, opts, subtract=True)
    path = ctx.out / "configs" / "merge.yaml"
    path.write_text(yaml.safe_dump({
        "output": {"path": "../models/merge"}, "target": "../models/instruct",
        "method": "task_arithmetic",
        "terms": [{"plus": "../models/grpo", "minus": "../models/sft", "weight": r.alpha}]},
        sort_keys=False))
    merge.run_merge(manifest.load(path), None, opts)
    diff = max_difference(models / "merge", models / "instruct_plus_v")
    return (f"extract grpo sft -> vector; add / subtract (alpha {r.alpha:g}); merge "
            f"{path.relative_to(ctx.out)}: max |merge - add| = {diff:.2g}")


def evaluate_row(ctx: Context, row: str, task: str) -> str:
    """Greedy exact match of a report row's model on its held-out task, written to
    OUT/eval/<model>.<task>.json (`eval_file`)."""
    from .evaluate import evaluate
    from .report import MODEL_DIRS

    result = evaluate(ctx.out / MODEL_DIRS[row], test_examples(ctx, task),
                      ctx.recipe.max_new_tokens)
    file = ctx.out / eval_file(row, task)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(result, indent=1))
    return f"{100 * result['accuracy']:.1f}% of {result['n']}"


def eval_file(row: str, task: str) -> str:
    from .report import MODEL_DIRS

    return f"eval/{MODEL_DIRS[row].split('/')[-1]}.{task}.json"


def test_examples(ctx: Context, task: str) -> list[tasks.Example]:
    """The held-out items of `task` ("arithmetic" or "instruction") written by the data stage."""
    return [tasks.Example(**json.loads(line))
            for line in (ctx.data / f"{task}_test.jsonl").read_text().splitlines()]


def make_sweep(ctx: Context) -> str:
    """instruct + α·v for each α of the recipe, applied in memory by `mergekit-rl sweep`'s own
    code (`mergekit_rl.inmemory`: bit for bit `add --alpha α`, nothing written), evaluated with
    the demo's greedy exact match on the first `sweep_items` held-out items of each task."""
    from mergekit_rl.inmemory import VectorInMemory, sweep
    from mergekit_rl.job import Options

    from .evaluate import evaluate_model, load

    r = ctx.recipe
    tests = {t: test_examples(ctx, t)[:r.sweep_items] for t in tasks.TASKS}
    model, tokenizer = load(ctx.models / "instruct")

    def evaluate(alpha: float) -> dict:
        return {t: {k: v for k, v in evaluate_model(model, tokenizer, ex, r.max_new_tokens)
                    .items() if k != "samples"} for t, ex in tests.items()}

    def points(vector: Path, alphas: tuple[float, ...]) -> list[dict]:
        with VectorInMemory(str(ctx.models / "instruct"), str(vector),
                            Options(device="cpu")) as applied:
            applied.attach(model)
            return [{"alpha": a, **result} for a, result in sweep(applied, alphas, evaluate)]

    record = {"items": {t: len(ex) for t, ex in tests.items()},
              "points": points(ctx.out / "vector", r.alphas()), "low_rank": []}
    for rank in LOW_RANKS:  # the vector compressed to rank R, at α = 1
        low = compress_vector(ctx.out / "vector", ctx.out / f"vector_r{rank}", rank)
        record["low_rank"] += [{"rank": rank, **p} for p in points(low, (1.0,))]
    file = ctx.out / "eval" / "sweep.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(record, indent=1))
    curve = ", ".join(f"{p['alpha']:g}: {100 * p['arithmetic']['accuracy']:.0f}%"
                      for p in record["points"])
    return (f"instruct + alpha·v in memory on {record['items']['arithmetic']} + "
            f"{record['items']['instruction']} held-out items per point; word problems {curve}")


LOW_RANKS = (32, 8, 2)  # the low-rank points of the sweep, at α = 1


def compress_vector(vector: Path, out: Path, rank: int) -> Path:
    """`mergekit-rl compress VECTOR -o OUT --rank R`: the vector as rank-R truncated SVDs in
    PEFT's LoRA format (1-D tensors dense beside them)."""
    from mergekit_rl.job import Options
    from mergekit_rl.lowrank import LowRank
    from mergekit_rl.vectors import compress

    compress(str(vector), out, LowRank(rank=rank), Options(overwrite=True,
                                                          command="mergekit-rl demo"))
    return out


def max_difference(a: Path, b: Path) -> float:
    from mergekit_rl.checkpoint import Checkpoint

    worst = 0.0
    with Checkpoint.open(a) as x, Checkpoint.open(b) as y:
        for name in x.tensors:
            worst = max(worst, float((x.read(name).float() - y.read(name).float()).abs().max()))
    return worst


def make_pairs(ctx: Context) -> str:
    r = ctx.recipe
    cfg = write_config(ctx, "pairs", {
        "model": {"path": str(ctx.models / "sft")},
        "data": {"path": str(ctx.data / "arithmetic_train.jsonl"),
                 "max_examples": r.pairs_prompts},
        "reward": {"function": "exact_answer"},
        "output": str(ctx.data / "pairs.jsonl"),
        "generation": {"num_samples": r.pairs_samples, "max_prompt_length": 192,
                       "max_completion_length": r.max_new_tokens, "temperature": 1.0},
        # hybrid (WPO's best setting): the worked solution joins the policy's samples
        "pairs": {"mode": "hybrid", "off_policy_fields": ["completion"], "rejected": "lowest"},
        "seed": r.seed, "overwrite": True})
    run_tool("pairs", cfg)
    n = len((ctx.data / "pairs.jsonl").read_text().splitlines())
    if n < r.wpo_batch:
        raise ConfigError(f"sample pairs gave {n} pairs, fewer than wpo_batch "
                          f"{r.wpo_batch}: raise pairs_prompts or pairs_samples")
    return f"sample pairs {cfg.relative_to(ctx.out)}: {n} (better, worse) pairs"


def preference_stage(name: str, weighting: bool):
    """`train wpo` from SFT on the sampled pairs, WPO weighting on (WPO) or off (DPO)."""
    def fn(ctx: Context) -> str:
        r = ctx.recipe
        cfg = write_config(ctx, name, {
            "model": {"path": str(ctx.models / "sft")},
            "data": {"path": str(ctx.data / "pairs.jsonl")},
            "train": train_section(ctx, name, r.wpo_batch, r.wpo_steps),
            "optim": {"lr": r.wpo_lr, "scheduler": "cosine", "warmup_ratio": 0.1},
            "wpo": {"loss_type": "sigmoid", "beta": r.wpo_beta, "weighting": weighting,
                    "max_length": 256, "max_prompt_length": 192}})
        run_tool("wpo", cfg)
        acc = logged(ctx.models / name, "rewards/accuracies")
        return (f"train wpo {cfg.relative_to(ctx.out)} (weighting {'on' if weighting else 'off'})"
                f": {r.wpo_steps} steps, reward accuracy {mean(acc[-3:]):.2f}")
    return fn


def make_judge(ctx: Context) -> str:
    """`train judge` from SFT on the sampled pairs (correct ≻ wrong), both orders per batch."""
    r = ctx.recipe
    n = len((ctx.data / "pairs.jsonl").read_text().splitlines())
    cfg = write_config(ctx, "judge", {
        "model": {"path": str(ctx.models / "sft")},
        "data": {"path": str(ctx.data / "pairs.jsonl")},
        "train": train_section(ctx, "judge", r.judge_batch, r.judge_steps),
        "optim": {"lr": r.judge_lr, "scheduler": "cosine", "warmup_ratio": 0.1},
        "judge": {"labels": ["Y", "N"], "max_question_length": 96, "max_response_length": 48,
                  "eval_size": max(1, min(64, n // 5))}})
    run_tool("judge", cfg)
    result = json.loads((ctx.models / "judge" / "judge_eval.json").read_text())
    return (f"train judge {cfg.relative_to(ctx.out)}: {r.judge_steps} steps, held-out pairwise "
            f"accuracy {result['eval/accuracy']:.2f}, position consistency "
            f"{result['eval/position_consistency']:.2f} ({result['eval/pairs']} pairs)")


def make_pairwise(ctx: Context) -> str:
    """`train pairwise` from SFT: reward P̄(sample ≻ the row's worked solution)."""
    r = ctx.recipe
    cfg = write_config(ctx, "pairwise", {
        "model": {"path": str(ctx.models / "sft")},
        "data": {"path": str(ctx.data / "arithmetic_train.jsonl")},
        "train": train_section(ctx, "pairwise", r.pairwise_prompts * r.pairwise_group,
                               r.pairwise_steps),
        "optim": {"lr": r.pairwise_lr},
        "pairwise": {"judge": str(ctx.models / "judge"), "anchor": "reference",
                     "anchor_field": "completion", "advantage": "anchor",
                     "num_generations": r.pairwise_group, "max_prompt_length": 192,
                     "max_completion_length": r.max_new_tokens,
                     "temperature": r.grpo_temperature, "loss_type": "grpo",
                     "judge_batch_size": 64}})
    run_tool("pairwise", cfg)
    rewards = logged(ctx.models / "pairwise", "reward")
    return (f"train pairwise {cfg.relative_to(ctx.out)}: {r.pairwise_steps} steps, judged "
            f"P̄(sample ≻ worked solution) {mean(rewards[:3]):.2f} -> {mean(rewards[-3:]):.2f}")


def make_pairwise_vector(ctx: Context) -> str:
    """`extract pairwise sft` and `add` it to the sibling."""
    from mergekit_rl.job import Options
    from mergekit_rl.vectors import apply, extract

    opts = Options(overwrite=True, command="mergekit-rl demo")
    extract(str(ctx.models / "pairwise"), str(ctx.models / "sft"), ctx.out / "vector_pairwise",
            opts)
    apply(str(ctx.models / "instruct"), str(ctx.out / "vector_pairwise"),
          ctx.models / "instruct_plus_v_pairwise", ctx.recipe.alpha, opts)
    return f"extract pairwise sft -> vector_pairwise; add instruct (alpha {ctx.recipe.alpha:g})"


def make_judged(ctx: Context) -> str:
    """The judge's verdict on each donor's greedy answers to the held-out problems against
    their worked solutions, separately for correct and flawed solutions."""
    from trainers.judging import Judge

    from .evaluate import greedy_responses, load

    tests = [tasks.Example(**json.loads(line))
             for line in (ctx.data / "arithmetic_test.jsonl").read_text().splitlines()]
    correct = [tasks.is_correct(e.completion, e) for e in tests]
    judge = Judge.load(str(ctx.models / "judge"), batch_size=64)
    result = {"judge": json.loads((ctx.models / "judge" / "judge_eval.json").read_text()),
              "n_correct": sum(correct), "n_flawed": len(tests) - sum(correct)}
    for name in ("sft", "grpo", "pairwise"):
        model, tokenizer = load(ctx.models / name)
        responses = greedy_responses(model, tokenizer, [e.prompt for e in tests],
                                     ctx.recipe.max_new_tokens)
        preference = judge.preference([e.prompt for e in tests], responses,
                                      [e.completion for e in tests]).tolist()
        row = {}
        for part, keep in (("correct", True), ("flawed", False)):
            values = [p for p, c in zip(preference, correct) if c == keep]
            row[part] = {"mean_preference": mean(values),
                         "win_rate": mean([float(p > 0.5) + 0.5 * (p == 0.5) for p in values])}
        result[name] = row
    path = ctx.out / "eval" / "judged.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    p = result["pairwise"]
    return (f"judged win rate of pairwise vs worked solutions: "
            f"{100 * p['correct']['win_rate']:.1f}% (correct ones), "
            f"{100 * p['flawed']['win_rate']:.1f}% (flawed ones)")


# (stage, outputs relative to OUT, function), in order
PIPELINE = (
    ("data", ["data"], make_data),
    ("base", ["models/base"], make_base),
    ("sft", ["models/sft"], sft_stage("sft", "base", "arithmetic_train.jsonl", "sft_steps",
                                      "sft_batch", "sft_lr")),
    ("grpo", ["models/grpo"], make_grpo),
    ("instruct", ["models/instruct"], sft_stage("instruct", "base", "instruction_train.jsonl",
                                                "instruct_steps", "instruct_batch",
                                                "instruct_lr")),
    ("vector", ["vector", "models/instruct_plus_v", "models/instruct_minus_v", "models/merge"],
     make_vectors),
    ("sweep", ["eval/sweep.json"], make_sweep),
    ("pairs", ["data/pairs.jsonl"], make_pairs),
    ("wpo", ["models/wpo"], preference_stage("wpo", True)),
    ("dpo", ["models/dpo"], preference_stage("dpo", False)),
    ("judge", ["models/judge"], make_judge),
    ("pairwise", ["models/pairwise"], make_pairwise),
    ("vector_pairwise", ["vector_pairwise", "models/instruct_plus_v_pairwise"],
     make_pairwise_vector),
    ("judged", ["eval/judged.json"], make_judged),
)
