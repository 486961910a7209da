"""`--dry-run`: what a run would do and roughly what it needs, without loading any weights.

The model is built on the meta device from its config (shapes and counts only). The report
gives the batch arithmetic per optimizer step (what is global, what each process does, how many
micro-batches it accumulates), the precision, and an estimate per process of the memory for
weights, gradients, optimizer state, a reference copy and the LM head's logits. Activations are
not estimated (they depend on the attention kernel and on gradient checkpointing).
"""

from __future__ import annotations

from . import logprobs, models

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def report(run) -> str:
    """The dry-run text of a `Run` whose `start` was called (plan set)."""
    config, plan, train = run.config, run._plan, run.train
    model_cfg = config.model
    skeleton = models.meta_model(model_cfg)
    total, trainable = models.parameter_counts(skeleton, model_cfg)
    head = skeleton.get_output_embeddings()
    vocab = head.out_features if head is not None else skeleton.config.vocab_size
    lora = model_cfg.lora
    world, accumulation, micro = run.world, run.accumulation, train.micro_batch_size
    unit = plan.get("unit", "rows")
    lines = [f"{run.kind} dry run (no weights loaded): {model_cfg.path} "
             f"({skeleton.config.model_type}), {total / 1e9:.3g} B parameters, vocabulary "
             f"{vocab:,}" + (f"; LoRA r={lora.r} on {', '.join(lora.target_modules)}: "
                             f"{trainable / 1e6:.3g} M trainable" if lora else "")]
    lines += [f"  {line}" for line in plan.get("lines", [])]
    lines.append(f"  per optimizer step: {train.batch_size} {unit} = {world} process"
                 f"{'es' if world > 1 else ''} x {accumulation} micro-batch"
                 f"{'es' if accumulation > 1 else ''} x {micro} {unit}; {run.max_steps} steps")
    sharded = run.shard
    lines.append(f"  precision: {model_cfg.dtype} weights"
                 + (f", {run.precision} autocast" if run.precision != "no" else
                    ", no autocast") + (f"; sharding: {sharded}" if sharded else ""))

    weight_bytes = BYTES[model_cfg.dtype]
    master = 4 if lora else weight_bytes  # peft keeps adapters in fp32
    full_shard = sharded in ("fsdp", "zero3")
    split = world if full_shard else 1
    weights = total * weight_bytes / split + (trainable * 4 if lora else 0)
    grads = trainable * master / (world if sharded else 1)
    deferred = head.weight.numel() * master \
        if model_cfg.lm_head_grad == "deferred" and head is not None and not lora else 0
    grads -= deferred  # formed a block of rows at a time at the step (`headgrad`)
    optimizer = 2 * trainable * master / (world if sharded else 1)  # AdamW: two moments
    reference = total * weight_bytes / split if plan.get("reference") and not lora else 0
    tokens = plan.get("sequences_per_micro", micro) * plan.get("sequence_length", 0)
    plain = logprobs.plain_tokens(vocab, model_cfg.lm_head_chunk_size)
    chunk = min(tokens, model_cfg.lm_head_chunk_size or logprobs.TOKEN_CHUNK)
    block = min(vocab, logprobs.tile_rows(chunk, tokens, run.device.type))
    whole = tokens * vocab * 4
    # the plain path: the logits, softmax/grad, a cast; the tiled head: one tile and a cast
    tiled = tokens > plain or deferred > 0  # a deferred head runs tiled at any size
    logits = chunk * block * 4 * 2 if tiled else tokens * vocab * 4 * 3
    parts = [("weights", weights), ("gradients", grads), ("optimizer (AdamW)", optimizer)]
    if reference and not model_cfg.reference_offload:
        parts.append(("reference copy", reference))
    parts.append(("LM-head logits", logits))
    lines.append("  memory per process (estimate): " + ", ".join(f"{name} {_gb(v)}"
                                                              for name, v in parts)
                 + f"; total {_gb(sum(v for _, v in parts))} + activations")
    if tokens:
        lines.append(f"  logits: {tokens:,} tokens per micro-batch x {vocab:,}; whole in "
                     f"float32 they would be {_gb(whole)}, the head runs in tiles of "
                     f"{chunk:,} tokens x {block:,} vocabulary rows" if tiled else
                     f"  logits: {tokens:,} tokens per micro-batch x {vocab:,} are taken whole "
                     f"({_gb(whole)} in float32)")
    if deferred:
        lines.append(f"  LM-head gradient: deferred (model.lm_head_grad), formed a block of "
                     f"vocabulary rows at a time at the optimizer step: {_gb(deferred)} less")
    if reference and model_cfg.reference_offload:
        lines.append(f"  reference: offloaded (model.reference_offload); its {_gb(reference)} are "
                     "on the device only during its log-prob passes, when there are no gradients"
                     + ("; on the CPU its embedding and LM head stay in its files, read a block "
                        "of rows at a time" if run.device.type == "cpu" else ""))
    if run.precision != "no":
        lines.append(f"  autocast keeps {run.precision} copies of the weights it uses: up to "
                     f"{_gb(total * 2 / split)} more")
    return "\n".join(lines)
