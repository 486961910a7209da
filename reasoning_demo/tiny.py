"""Tiny local models and a tokenizer, built without the Hub, for tests and the demo.

Everything here is deterministic given a seed and takes milliseconds: a byte-level BPE tokenizer
trained on a built-in corpus, a Qwen2 or Llama model with a few thousand parameters written with
`save_pretrained` (optionally in many small shards), and "fine-tuned" siblings that differ from
their parent by seeded Gaussian noise in every floating tensor.

Pass the same `max_shard_size` to `finetune_copy` to give a sibling the parent's sharding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import trainers as tokenizer_trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from mergekit_rl.checkpoint import TOKENIZER_FILES, copy_side_files

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS, IM_START, IM_END)

# transformers 5 rebuilds `Qwen2Tokenizer` (this split regex + NFC) for any `model_type: qwen2`
# directory, whatever tokenizer.json says; a tokenizer trained with other pre-tokenisation would
# change its ids on reload (SPEC §4). Copied from transformers/models/qwen2/tokenization_qwen2.py.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONFIGS = {"qwen2": Qwen2Config, "llama": LlamaConfig}


def default_corpus() -> list[str]:
    """A few hundred short English and arithmetic lines, generated (no data files)."""
    lines = [f"{a} + {b} = {a + b}" for a in range(0, 60, 3) for b in range(1, 40, 4)]
    lines += [f"{a} - {b} = {a - b}" for a in range(10, 50, 5) for b in range(1, 10, 2)]
    subjects = ["The cat", "A student", "My friend", "The old man", "Every child", "She", "He"]
    verbs = ["reads", "writes", "counts", "adds", "finds", "likes", "solves"]
    objects = ["a book", "the numbers", "two apples", "the answer", "a long letter", "problems"]
    lines += [f"{s} {v} {o}." for s in subjects for v in verbs for o in objects]
    lines += [f"Question: What is {a} plus {a + 7}?\nAnswer: {2 * a + 7}" for a in range(20)]
    lines += ["It's a test. Isn't it?  Yes, it is!", "Hello, world!\n\n  Indented line\tand tab."]
    return lines


def build_tokenizer(
    out_dir: Path, corpus: Iterable[str] | None = None, vocab_size: int = 300
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally and save it to `out_dir`.

    Special tokens `<|endoftext|>` (eos and pad), `<|im_start|>`, `<|im_end|>` take ids 0, 1, 2.
    Pre-tokenisation is Qwen2's (split regex + NFC), so the ids are the same whether the directory
    is reloaded as a generic tokenizer or, next to a qwen2 config.json, as `Qwen2Tokenizer`.
    """
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = tokenizer_trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) if corpus is not None else default_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, extra_special_tokens=[IM_START, IM_END]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    log.info("tokenizer with %d tokens written to %s", len(tokenizer), out_dir)
    return tokenizer


def _save(model: torch.nn.Module, out_dir: Path, max_shard_size: str | int | None) -> None:
    """Write weights, config and generation config."""
    if max_shard_size is not None:
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(out_dir)


def build_model(
    out_dir: Path,
    *,
    arch: str = "qwen2",
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Write a randomly initialised causal LM with its tokenizer to `out_dir`.

    `tied` ties lm_head to embed_tokens (no `lm_head.weight` in the checkpoint, like
    Qwen2.5-0.5B/1.5B). A small `max_shard_size` (e.g. "20KB") gives a sharded checkpoint with an
    index. `vocab_size` defaults to the tokenizer's size. Tensors that initialise to a constant
    (norm weights, attention biases) are perturbed, so that every tensor differs between seeds.
    """
    if arch not in CONFIGS:
        raise ValueError(f"arch {arch!r} is not supported; expected one of {sorted(CONFIGS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        build_tokenizer(out_dir)
    else:
        copy_side_files(Path(tokenizer_dir), out_dir, TOKENIZER_FILES)
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    eos_id = tok.token_to_id(EOS)
    # No pad_token_id in the model config: it would make the embedding's pad row all zeros.
    config = CONFIGS[arch](
        vocab_size=vocab_size or tok.get_vocab_size(with_added_tokens=True),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        dtype=dtype,  # transformers 5: `dtype`, not `torch_dtype`
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # shared (tied) parameters are listed once
            if param.is_floating_point() and bool((param == param.flatten()[0]).all()):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id
    )
    _save(model, out_dir, max_shard_size)
    log.info("%s model (tied=%s, %s, seed %d) written to %s", arch, tied, dtype, seed, out_dir)
    return out_dir


def _checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def finetune_copy(
    src: Path,
    out_dir: Path,
    *,
    seed: int,
    scale: float = 0.01,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write a "fine-tuned" sibling of `src`: every floating parameter plus `scale * randn`.

    The checkpoint's dtype and tying are kept (a tied matrix gets its noise once). The shard size
    is `max_shard_size` (None: one file). The noise
    is added in float32 and rounded to the checkpoint's dtype.
    """
    src, out_dir = Path(src), Path(out_dir)
    config = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=_checkpoint_dtype(config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                noise = scale * torch.randn(param.shape, generator=generator)
                param.copy_((param.float() + noise).to(param.dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    _save(model, out_dir, max_shard_size)
    copy_side_files(Path(src), out_dir, TOKENIZER_FILES)
    log.info("fine-tuned copy of %s (seed %d, scale %g) written to %s", src, seed, scale, out_dir)
    return out_dir
