"""Research harness for the miniature reasoning-vector experiment (issue 7), all in memory.

One run = one recipe and one seed:

  tokenizer + tiny Qwen2 base pretrained on both task families (trainers.tasks)
  -> SFT donor (arithmetic) -> GRPO donor (from SFT, exact-answer reward)
  -> instruct sibling (SFT from the base on word-list instructions)
  -> v = GRPO − SFT;  instruct + α·v,  instruct − v
  -> greedy exact-match accuracy on held-out items, time per stage.

The loops here are deliberately compact (no checkpoints, no accelerate) so that a recipe can be
searched quickly; the recipe itself is plain hyper-parameters (`Recipe`) for the production
trainers to reproduce.

    .venv/bin/python benchmarks/demo_probe.py --seeds 0 1 2
    .venv/bin/python benchmarks/demo_probe.py --quick --seeds 0
    .venv/bin/python benchmarks/demo_probe.py --set grpo_steps=200 --set alphas=0.5,1,2 \
        --json out.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reasoning_demo import tasks  # noqa: E402
from reasoning_demo.recipe import Recipe as DemoRecipe  # noqa: E402


@dataclass(frozen=True)
class Recipe(DemoRecipe):
    """The demo's recipe (same fields, same defaults) plus the probe's extras."""

    test_seed: int = 1234  # same test items for every seed and recipe
    alphas: tuple[float, ...] = (0.5, 2.0)  # α values reported besides +1 and −1
    curve_every: int = 0  # > 0: score the base on 300 test items every this many pretrain steps


QUICK = dict(n_test=300, pretrain_docs=4000, pretrain_steps=400, sft_steps=20, grpo_steps=15,
             instruct_steps=30, hidden=64, intermediate=192, layers=2)


def parse_value(field: dataclasses.Field, text: str):
    default = field.default
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, tuple):
        return tuple(float(x) for x in text.split(",") if x)
    return type(default)(text)


# ---------------------------------------------------------------------------------------------
# Tokens

class Codec:
    """Tokenizer wrapper: ids of texts, pad/eos ids, decoding."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.pad = tokenizer.pad_token_id
        self.im_end = tokenizer.convert_tokens_to_ids(tasks.IM_END)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.backend_tokenizer.encode_batch(texts,
                                                                        add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def token_logps(model, ids, temperature: float = 1.0) -> torch.Tensor:
    """log π(ids[:, t] | ids[:, :t]) for t ≥ 1 -> [B, T-1]. Rows are right-padded, so causal
    attention alone keeps padding out of every real position (no attention mask needed)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def generate(model, codec: Codec, prompts: list[list[int]], max_new: int,
             temperature: float = 0.0, generator: torch.Generator | None = None
             ) -> list[list[int]]:
    """KV-cache decoding from left-padded prompts; each result is cut after `<|im_end|>`."""
    from transformers import DynamicCache

    n, length = len(prompts), max(map(len, prompts))
    ids = torch.full((n, length), codec.pad, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p)
        mask[i, length - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = torch.full((n, max_new), codec.pad, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    step_ids, step_pos = ids, positions
    for t in range(max_new):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                       cache=cache, use_cache=True).logits[:, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, codec.pad), nxt)
        out[:, t] = nxt
        done |= nxt == codec.im_end
        if bool(done.all()):
            break
        step_ids = nxt.unsqueeze(-1)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
    results = []
    for row in out.tolist():
        results.append(row[:row.index(codec.im_end) + 1] if codec.im_end in row else
                       [x for x in row if x != codec.pad])
    return results


# ---------------------------------------------------------------------------------------------
# Training loops

def make_optimizer(model, lr: float, steps: int, warmup: int = 0, decay_to: float = 1.0):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))

    def factor(step):  # linear warmup, cosine decay to `decay_to` of the peak
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return decay_to + (1 - decay_to) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def lm_steps(model, batches, lr: float, steps: int, warmup: int = 0, decay_to: float = 1.0,
             callback=None, every: int = 0):
    """Token cross-entropy on the weighted positions; `batches()` yields (ids, mask, weights).
    `callback(step)` runs every `every` steps (model in eval mode meanwhile)."""
    opt, sched = make_optimizer(model, lr, steps, warmup, decay_to)
    model.train()
    losses = []
    for _ in range(steps):
        ids, mask, weights = next(batches)
        logp = token_logps(model, ids)
        w = weights[:, 1:].float()
        loss = -(logp * w).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if every and callback and (len(losses) % every == 0):
            model.eval()
            callback(len(losses))
            model.train()
    model.eval()
    return losses


def doc_batches(codec: Codec, docs: list[str], batch: int, rng: random.Random):
    """Pretraining: whole documents, loss on every real token."""
    encoded = codec.encode(docs)
    while True:
        chosen = [encoded[rng.randrange(len(encoded))] for _ in range(batch)]
        ids, mask = right_pad(chosen, codec.pad)
        yield ids, mask, mask


def sft_batches(codec: Codec, examples: list[tasks.Example], batch: int, rng: random.Random):
    """SFT: loss on the completion and its `<|im_end|>` only."""
    prompts = codec.encode([tasks.render_prompt(e.prompt) for e in examples])
    completions = codec.encode([e.completion + tasks.IM_END for e in examples])
    order: list[int] = []
    while True:
        if len(order) < batch:
            order += rng.sample(range(len(examples)), len(examples))
        chosen, order = order[:batch], order[batch:]
        seqs = [prompts[i] + completions[i] for i in chosen]
        ids, mask = right_pad(seqs, codec.pad)
        weights = torch.zeros_like(mask)
        for row, i in enumerate(chosen):
            weights[row, len(prompts[i]):len(seqs[row])] = 1
        yield ids, mask, weights


def grpo(model, codec: Codec, examples: list[tasks.Example], r: Recipe, rng: random.Random,
         generator: torch.Generator, log: list):
    """GRPO (DeepSeekMath): G samples per prompt, group-normalised exact-answer advantages,
    one on-policy update per round (ratio 1), mean over each sequence's tokens then over
    sequences, optional k3 KL to the starting model."""
    ref = None
    if r.grpo_beta > 0:
        import copy
        ref = copy.deepcopy(model).eval()
    prompts = codec.encode([tasks.render_prompt(e.prompt) for e in examples])
    opt, sched = make_optimizer(model, r.grpo_lr, r.grpo_steps)
    for step in range(r.grpo_steps):
        t0 = time.perf_counter()
        chosen = rng.sample(range(len(examples)), r.grpo_prompts)
        batch_prompts = [prompts[i] for i in chosen for _ in range(r.grpo_group)]
        model.eval()
        completions = generate(model, codec, batch_prompts, r.max_new_tokens,
                               r.grpo_temperature, generator)
        t_gen = time.perf_counter() - t0
        rewards = torch.tensor([float(tasks.is_correct(codec.decode(c), examples[i]))
                                for c, i in zip(completions,
                                                [i for i in chosen for _ in range(r.grpo_group)])])
        grouped = rewards.view(-1, r.grpo_group)
        adv = ((grouped - grouped.mean(1, keepdim=True))
               / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        seqs = [p + c for p, c in zip(batch_prompts, completions)]
        ids, mask = right_pad(seqs, codec.pad)
        cmask = torch.zeros_like(mask, dtype=torch.float)
        for row, (p, c) in enumerate(zip(batch_prompts, completions)):
            cmask[row, len(p):len(p) + len(c)] = 1
        cmask = cmask[:, 1:]
        model.train()
        active = adv.abs() > 0  # groups with equal rewards carry no gradient: skip them
        if bool(active.any()):
            sel = active.nonzero().squeeze(-1)
            logp = token_logps(model, ids[sel], r.grpo_temperature)
            per_token = -adv[sel].unsqueeze(-1) * logp  # ratio 1: ∇ = −A ∇log π
            if ref is not None:
                with torch.no_grad():
                    ref_logp = token_logps(ref, ids[sel], r.grpo_temperature)
                d = ref_logp - logp
                per_token = per_token + r.grpo_beta * (torch.exp(d) - d - 1)
            m = cmask[sel]
            # mean over each sequence's tokens, then over all sequences of the batch
            loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum() / len(adv)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        log.append({"step": step, "reward": float(rewards.mean()), "gen_s": t_gen,
                    "step_s": time.perf_counter() - t0})
    model.eval()


# ---------------------------------------------------------------------------------------------
# Evaluation and arithmetic on weights

def evaluate(model, codec: Codec, examples: list[tasks.Example], max_new: int,
             batch: int = 500) -> float:
    prompts = codec.encode([tasks.render_prompt(e.prompt) for e in examples])
    responses = []
    for i in range(0, len(prompts), batch):
        responses += [codec.decode(c) for c in generate(model, codec, prompts[i:i + batch],
                                                        max_new)]
    return tasks.accuracy(responses, examples)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def norm(sd: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.float().pow(2).sum()) for v in sd.values()))


def diff(a, b):
    return {k: a[k] - b[k] for k in a}


def cosine(a, b) -> float:
    dot = sum(float((a[k].float() * b[k].float()).sum()) for k in a)
    return dot / (norm(a) * norm(b) + 1e-12)


# ---------------------------------------------------------------------------------------------

def run(r: Recipe, seed: int, verbose: bool = True) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    from reasoning_demo.tiny import build_tokenizer

    hf_logging.set_verbosity_error()
    torch.set_num_threads(r.threads)
    say = print if verbose else (lambda *a, **k: None)
    times: dict[str, float] = {}
    t = time.perf_counter()
    arith, instr = r.arithmetic_spec(), r.instruction_spec()
    a_split = tasks.make_split(tasks.ARITHMETIC, max(r.sft_train, r.grpo_prompts), r.n_test,
                               r.test_seed, arithmetic=arith)
    i_split = tasks.make_split(tasks.INSTRUCTION, r.instruct_train, r.n_test, r.test_seed,
                               instruction=instr)
    # Training draws vary with the seed; the held-out items do not.
    rng = random.Random(seed)
    a_train = tasks.sample_unique(tasks.generator(tasks.ARITHMETIC, arith),
                                  random.Random(f"{seed}/a_train"), r.sft_train,
                                  exclude=[e.prompt for e in a_split.test])
    i_train = tasks.sample_unique(tasks.generator(tasks.INSTRUCTION, instruction=instr),
                                  random.Random(f"{seed}/i_train"), r.instruct_train,
                                  exclude=[e.prompt for e in i_split.test])
    exclude = [e.prompt for e in a_split.test + i_split.test]
    docs = tasks.pretraining_corpus(r.pretrain_docs, seed, arithmetic_share=r.pretrain_share,
                                    exclude=exclude, arithmetic=arith, instruction=instr)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp), corpus=docs[:5000], vocab_size=r.vocab_size)
    codec = Codec(tokenizer)
    times["data+tokenizer"] = time.perf_counter() - t

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=r.hidden,
                         intermediate_size=r.intermediate, num_hidden_layers=r.layers,
                         num_attention_heads=r.heads, num_key_value_heads=r.kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=codec.pad, eos_token_id=codec.im_end)
    model = Qwen2ForCausalLM(config).eval()
    n_params = sum(p.numel() for p in model.parameters())

    def fresh(sd):
        m = Qwen2ForCausalLM(config)
        m.load_state_dict(sd)
        return m.eval()

    curve = []

    def score_base(step):
        t_cb = time.perf_counter()
        curve.append((step, evaluate(model, codec, a_split.test[:300], r.max_new_tokens),
                      evaluate(model, codec, i_split.test[:300], r.max_new_tokens)))
        say(f"  pretrain step {step}: arith {100 * curve[-1][1]:.1f} instr "
            f"{100 * curve[-1][2]:.1f}")
        nonlocal_skip[0] += time.perf_counter() - t_cb

    nonlocal_skip = [0.0]
    t = time.perf_counter()
    # Research convenience: PROBE_CACHE=dir reuses a pretrained base (same recipe prefix + seed).
    import hashlib
    import os
    cache_dir = os.environ.get("PROBE_CACHE")
    pre_fields = [f.name for f in dataclasses.fields(Recipe)][:dataclasses.fields(Recipe).index(
        next(f for f in dataclasses.fields(Recipe) if f.name == "sft_train"))]
    key = hashlib.sha1(repr(([getattr(r, k) for k in pre_fields if k not in ("n_test",)],
                             seed)).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"base-{key}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        saved = torch.load(cache)
        model.load_state_dict(saved["state"])
        losses, times["pretrain"] = saved["losses"], saved["time"]
        # (the later batch draws then differ from an uncached run's: exploration only)
    else:
        losses = lm_steps(model, doc_batches(codec, docs, r.pretrain_batch, rng),
                          r.pretrain_lr, r.pretrain_steps, warmup=max(1, r.pretrain_steps // 20),
                          decay_to=0.1, callback=score_base, every=r.curve_every)
        times["pretrain"] = time.perf_counter() - t - nonlocal_skip[0]
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state": state(model), "losses": losses, "time": times["pretrain"]},
                       cache)
    base = state(model)
    say(f"seed {seed}: {n_params / 1e6:.2f} M params, vocab {len(tokenizer)}; pretrain loss "
        f"{losses[0]:.2f} -> {statistics.mean(losses[-20:]):.3f} in {times['pretrain']:.0f}s")

    t = time.perf_counter()
    sft = fresh(base)
    lm_steps(sft, sft_batches(codec, a_train, r.sft_batch, rng), r.sft_lr, r.sft_steps)
    times["sft"] = time.perf_counter() - t

    t = time.perf_counter()
    grpo_model = fresh(state(sft))
    glog: list = []
    grpo(grpo_model, codec, a_train, r, rng, torch.Generator().manual_seed(seed), glog)
    times["grpo"] = time.perf_counter() - t
    say(f"  GRPO reward {statistics.mean(x['reward'] for x in glog[:10]):.2f} -> "
        f"{statistics.mean(x['reward'] for x in glog[-10:]):.2f}; {times['grpo']:.0f}s "
        f"(generation {sum(x['gen_s'] for x in glog):.0f}s)")

    t = time.perf_counter()
    instruct = fresh(base)
    n_arith = round(r.instruct_train * r.instruct_arith_share)
    mix = i_train[:r.instruct_train - n_arith] + a_train[len(a_train) - n_arith:]
    lm_steps(instruct, sft_batches(codec, mix, r.instruct_batch, rng), r.instruct_lr,
             r.instruct_steps)
    times["instruct"] = time.perf_counter() - t

    sd = {"sft": state(sft), "grpo": state(grpo_model), "instruct": state(instruct)}
    vector = diff(sd["grpo"], sd["sft"])
    models = {"base": fresh(base), "sft": sft, "grpo": grpo_model, "instruct": instruct}
    alphas = sorted({1.0, -1.0, *r.alphas})
    for a in alphas:
        name = "instruct+v" if a == 1 else "instruct-v" if a == -1 else f"instruct{a:+g}v"
        models[name] = fresh({k: sd["instruct"][k] + a * vector[k] for k in vector})

    t = time.perf_counter()
    table = {}
    for name, m in models.items():
        table[name] = {"arith": evaluate(m, codec, a_split.test, r.max_new_tokens)}
        if name in ("base", "instruct", "instruct+v", "instruct-v"):
            table[name]["instr"] = evaluate(m, codec, i_split.test, r.max_new_tokens)
    times["eval"] = time.perf_counter() - t

    geometry = {
        "|sft-base|": norm(diff(sd["sft"], base)), "|v|": norm(vector),
        "|instruct-base|": norm(diff(sd["instruct"], base)), "|base|": norm(base),
        "cos(v, sft-base)": cosine(vector, diff(sd["sft"], base)),
        "cos(instruct-base, sft-base)": cosine(diff(sd["instruct"], base), diff(sd["sft"], base)),
    }
    for name, row in table.items():
        say(f"  {name:<14} arith {100 * row['arith']:5.1f}"
            + (f"   instr {100 * row['instr']:5.1f}" if "instr" in row else ""))
    say("  " + ", ".join(f"{k} {v:.3g}" for k, v in geometry.items()))
    say("  times: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
        + f", total {sum(times.values()):.0f}s")
    return {"seed": seed, "recipe": dataclasses.asdict(r), "table": table, "times": times,
            "geometry": geometry, "params": n_params, "curve": curve,
            "grpo_reward": [round(x["reward"], 3) for x in glog]}


def summarise(results: list[dict]) -> None:
    """Mean ± sample std over seeds, and the three goals per seed."""
    print(f"\n{len(results)} seed(s): {[x['seed'] for x in results]}")
    for name in results[0]["table"]:
        for col in ("arith", "instr"):
            vals = [100 * x["table"][name][col] for x in results if col in x["table"][name]]
            if vals:
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                print(f"  {name:<14} {col:<5} {statistics.mean(vals):5.1f} ± {sd:4.1f}   "
                      f"[{', '.join(f'{v:.1f}' for v in vals)}]")
    for label, a, b in (("grpo-sft", "grpo", "sft"), ("(inst+v)-inst", "instruct+v", "instruct"),
                        ("inst-(inst-v)", "instruct", "instruct-v")):
        d = [100 * (x["table"][a]["arith"] - x["table"][b]["arith"]) for x in results]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        print(f"  {label:<14} {statistics.mean(d):+5.1f} ± {sd:4.1f}   "
              f"[{', '.join(f'{v:+.1f}' for v in d)}]")
    tot = [sum(x["times"].values()) for x in results]
    print(f"  total time per run: {statistics.mean(tot):.0f}s (max {max(tot):.0f}s)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke-size recipe")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--json", type=Path, help="append one JSON line per run")
    args = parser.parse_args(argv)
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    overrides = dict(QUICK) if args.quick else {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            parser.error(f"--set {key}: not a Recipe field ({', '.join(fields)})")
        overrides[key] = parse_value(fields[key], value)
    recipe = Recipe(**overrides)
    print("recipe overrides:", overrides or "none")
    results = []
    for seed in args.seeds:
        results.append(run(recipe, seed))
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    summarise(results)


if __name__ == "__main__":
    main()
