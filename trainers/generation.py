"""Generation for the trainers and their users: left-padded batches, the stop tokens, sampled
completions with KV-cache `generate`, and the choice of sampling backend.

One function decides where a completion ends (`stop_token_ids`), for GRPO, both samplers and
evaluation: the tokenizer's eos, the model's generation_config eos (an int or a list), and the
token that closes an assistant turn in the chat template (`<|im_end|>` for Qwen2.5, whose eos
is `<|endoftext|>`; `<|eot_id|>` for Llama 3). Without the last, a chat model's completion runs
on into invented turns, and a reward reads the wrong `####`.

A config with `backend: hf | vllm` and a `vllm:` section (GRPO, the samplers) samples through
`make_sampler`: `HFSampler` is `sample` / `greedy` below on the policy itself, `VLLMSampler`
(trainers/vllm_engine.py) a colocated vLLM engine that gets the policy's weights when its
version (`step`) changes. Both take and return token ids and apply the same knobs and stops.
A trainer that samples (its config has `backend` and `vllm` fields, its knobs a section with
temperature, top_p, top_k, max_completion_length):

    check_backend(config, config.grpo, "grpo")   # before scaffold.Run touches the output folder
    sampler = make_sampler(config, tokenizer.pad_token_id, max_prompt + max_completion, seed)
    run.start(...)                                # after the engine (vLLM seeds the RNGs)
    with run.signals(), contextlib.closing(sampler):
        ...
        samples = sampler.sample(prompt_ids, config.grpo, stops, policy=run.policy,
                                 step=run.step, logprobs=True)  # .tokens, .logprobs (or None)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import SENTINEL


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists for generation. -> input_ids, attention_mask: LongTensor [b, T]"""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, x in enumerate(seqs):
        ids[row, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[row, width - len(x):] = 1
    return ids, mask


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message, if any."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates raise many types (role checks, jinja errors): no answer
        return None
    if SENTINEL not in text:
        return None
    after = tokenizer(text.split(SENTINEL, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return after[0] if after and after[0] in special else None


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """Token ids that end a completion: the tokenizer's eos, the model's generation_config eos
    and the chat template's end-of-turn token."""
    # `model`: a model, or its GenerationConfig (samplers that load no model for vLLM)
    extra = getattr(getattr(model, "generation_config", model), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer),
           *(extra if isinstance(extra, list) else [extra])}
    return {i for i in ids if i is not None}


def saved_generation_config(model):
    """The GenerationConfig `from_pretrained` would attach to the model of `model` (a
    ModelConfig), read without loading weights: its eos ids are stop tokens."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model.path, revision=model.revision)
    except OSError:  # no generation_config.json: transformers derives one from config.json
        return GenerationConfig.from_model_config(
            AutoConfig.from_pretrained(model.path, revision=model.revision))


def cut_at_stop(tokens: list[int], stops: set[int], keep_stop: bool = True) -> list[int]:
    """`tokens` up to the first stop token (kept with `keep_stop`, as the loss trains on it)."""
    end = next((i for i, t in enumerate(tokens) if t in stops), None)
    if end is None:
        return tokens
    return tokens[:end + 1] if keep_stop else tokens[:end]


class SeededSampler:
    """A logits processor that turns greedy decoding into sampling from per-row generators:
    argmax(z + Gumbel noise) is a draw from softmax(z) (the Gumbel-max trick), and row r's
    noise comes from its own generator, so its sample depends on its seed alone, not on which
    rows share the batch or the process. Put it after the temperature / top-k / top-p warpers
    (HF's sampling applies the same warpers, then draws from the softmax)."""

    def __init__(self, seeds: list[int], device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=g, device=scores.device)
                         for g in self.generators])  # [b, V]
        tiny = torch.finfo(u.dtype).tiny
        return scores.float() - torch.log(-torch.log(u.clamp(min=tiny)))


def _seeded_processors(params, seeds: list[int], device):
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = []
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList(warpers + [SeededSampler(seeds, device)])


@torch.no_grad()
def sample(model, prompts: list[list[int]], params, pad_id: int, eos_ids: set[int], device,
           seeds: list[int] | None = None, synced_gpus: bool = False) -> list[list[int]]:
    """One sampled completion per prompt (repeat prompts for G), cut after the first stop token.

    `params` has temperature, top_p, top_k (0: off), max_completion_length and
    generation_batch_size (sequences per `generate` call; None: all at once). With `seeds` (one
    per prompt) each completion draws from its own generator (`SeededSampler`); without, from
    the process's RNG. `synced_gpus`: every process runs the same number of decoding steps
    (needed when the weights are sharded).
    """
    from transformers import GenerationConfig

    # Every sampling knob is set explicitly: transformers fills unset (None) fields from the
    # model's generation_config (Qwen2.5: top_k 20, top_p 0.8, repetition_penalty 1.05), which
    # would sample from a distribution other than the π the loss assumes.
    knobs = dict(min_p=0.0, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                 max_new_tokens=params.max_completion_length, num_beams=1, use_cache=True,
                 pad_token_id=pad_id, eos_token_id=sorted(eos_ids))
    if seeds is None:
        gen = GenerationConfig(do_sample=True, temperature=params.temperature,
                               top_p=params.top_p, top_k=params.top_k, **knobs)
    else:  # greedy over Gumbel-perturbed, warped logits: the warpers come as processors
        gen = GenerationConfig(do_sample=False, temperature=None, top_p=None, top_k=None,
                               **knobs)
    was_training = model.training
    model.eval()  # gradient checkpointing would switch the KV cache off in train mode
    chunk = params.generation_batch_size or len(prompts)
    completions: list[list[int]] = []
    for start in range(0, len(prompts), chunk):
        ids, mask = left_pad(prompts[start:start + chunk], pad_id)
        width = ids.shape[1]
        extra = {} if seeds is None else {"logits_processor": _seeded_processors(
            params, seeds[start:start + chunk], device)}
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=gen, synced_gpus=synced_gpus,
                             **extra)[:, width:].tolist()
        completions += [cut_at_stop(tokens, eos_ids) for tokens in out]
    model.train(was_training)
    return completions


@torch.no_grad()
def greedy(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, stops: set[int],
           batch_size: int = 256, synced_gpus: bool = False) -> list[list[int]]:
    """The greedy continuation of each prompt, up to (not including) its first stop token."""
    from transformers import GenerationConfig

    # Every knob explicit: unset fields would be filled from the model's generation_config.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True,
                              pad_token_id=pad_id, eos_token_id=sorted(stops), temperature=None,
                              top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start:start + batch_size], pad_id)
        width = ids.shape[1]
        tokens = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                generation_config=config,
                                synced_gpus=synced_gpus)[:, width:].tolist()
        out += [cut_at_stop(t, stops, keep_stop=False) for t in tokens]
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# Backends

@dataclass
class Samples:
    """Sampled completions: token ids cut after the first stop token, and from an engine that
    reports them the log-probability it gave each kept token (a diagnostic, never trained on)."""

    tokens: list[list[int]]
    logprobs: list[list[float]] | None = None


class HFSampler:
    """`backend: hf`: `sample` and `greedy` above on the policy itself (always current)."""

    name = "hf"

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def sample(self, prompts: list[list[int]], params, stops: set[int], policy=None,
               step: int | None = None, logprobs: bool = False,
               seeds: list[int] | None = None, synced_gpus: bool = False,
               device=None) -> Samples:
        """`sample` above; `logprobs` is ignored (the policy's own are computed for the loss)."""
        device = device if device is not None else next(policy.parameters()).device
        return Samples(sample(policy, prompts, params, self.pad_id, stops, device, seeds=seeds,
                              synced_gpus=synced_gpus))

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, stops: set[int], policy=None,
               step: int | None = None) -> list[list[int]]:
        return greedy(policy, prompts, max_new_tokens, self.pad_id, stops)

    def close(self) -> None:
        pass


def check_backend(config, params, section: str) -> None:
    """Refuse a `backend: vllm` that cannot run (vLLM missing, model unsupported, a knob in
    `params` out of vLLM's range; `section` names them) before any folder is touched or weights
    load. A config without `backend` samples with hf."""
    if getattr(config, "backend", "hf") == "vllm":
        from .vllm_engine import check_vllm

        check_vllm(config.model, config.vllm, params, section)


class VLLMSampler:
    """`backend: vllm`: the same calls on a vLLM engine (trainers/vllm_engine.py). `step`, where
    given, is the policy's version (its optimizer step): when it differs from the last one
    loaded, the engine loads `policy`'s weights first; `step=None` samples from the weights the
    engine holds (a sampler's frozen model)."""

    name = "vllm"

    def __init__(self, engine):
        self.engine = engine

    @property
    def sync_s(self) -> float:
        """Seconds the last weight sync took."""
        return self.engine.sync_s

    def sample(self, prompts: list[list[int]], params, stops: set[int], policy=None,
               step: int | None = None, logprobs: bool = False,
               seeds: list[int] | None = None, synced_gpus: bool = False,
               device=None) -> Samples:
        """With `seeds`, each request samples with its own seed (vLLM's per-request `seed`):
        the samples then do not depend on the batching or the processes, as with hf, though
        they differ from hf's (another sampler)."""
        self.engine.sync(policy, step)
        out = self.engine.generate(prompts, temperature=params.temperature, top_p=params.top_p,
                                   top_k=params.top_k, max_tokens=params.max_completion_length,
                                   stops=stops, logprobs=logprobs, seeds=seeds)
        tokens = [cut_at_stop(ids, stops) for ids, _ in out]  # vLLM stops there already
        return Samples(tokens, [lp[:len(t)] for t, (_, lp) in zip(tokens, out)]
                       if logprobs else None)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, stops: set[int], policy=None,
               step: int | None = None) -> list[list[int]]:
        self.engine.sync(policy, step)
        out = self.engine.generate(prompts, temperature=0.0, max_tokens=max_new_tokens,
                                   stops=stops)
        return [cut_at_stop(ids, stops, keep_stop=False) for ids, _ in out]

    def close(self) -> None:
        self.engine.close()


def make_sampler(config, pad_id: int, max_model_len: int, seed: int) -> HFSampler | VLLMSampler:
    """The sampler of `config.backend`: `HFSampler`, or a `VLLMSampler` whose engine starts now
    from `config.model.path` with the `config.vllm` options (`max_model_len` when its own is
    null; `seed` plus the rank). Call `close()` when done."""
    if getattr(config, "backend", "hf") == "hf":
        return HFSampler(pad_id)
    from .vllm_engine import Engine, check_vllm

    check_vllm(config.model, config.vllm)
    return VLLMSampler(Engine(config.model, config.vllm, max_model_len, seed))


def logprob_gap(policy_logps: torch.Tensor, engine_logps: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """Σ |log π_policy − log π_engine| over the masked tokens (divide by their count for the
    mean): how far the engine's sampling distribution is from the policy the loss assumes,
    the silent off-policy drift of a separate inference engine. [b, T] x3 -> scalar"""
    return ((policy_logps - engine_logps).abs() * mask).sum()
