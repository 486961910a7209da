"""Model cards for trainer outputs: Hub front matter, the recipe, final metrics, usage.

Written next to every saved model (final output and checkpoints) by `checkpointing.save_model`,
so that `mergekit-rl push` or `--push-to-hub` publishes a folder that explains itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

TRAINERS = {"SFTConfig": ("sft", "Supervised fine-tuning on completions"),
            "GRPOConfig": ("grpo", "GRPO (DeepSeekMath, arXiv 2402.03300)"),
            "WPOConfig": ("wpo", "Preference optimisation with WPO weighting (arXiv 2406.11827)"),
            "JudgeConfig": ("judge", "A generative pairwise judge (Pairwise-RL, arXiv 2504.04950; "
                                     "our reconstruction)"),
            "PairwiseConfig": ("pairwise", "Pairwise-RL's anchor-relative policy step (arXiv "
                                           "2504.04950; our reconstruction)")}


def _hub_id(path: str) -> str | None:
    """`path` when it names a Hub repo (org/name), not a local folder."""
    from mergekit_rl.hub import local_path, split_hub_id

    if local_path(path) is not None:
        return None
    return split_hub_id(path)[0]


def _metric(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def write_training_card(directory: Path, config, config_dict: dict, state: dict,
                        adapter: bool = False) -> None:
    """README.md in `directory` for a model (or, with `adapter`, a PEFT adapter) trained from
    `config.model.path`."""
    from huggingface_hub import ModelCard, ModelCardData

    from mergekit_rl.provenance import card_license, hub_lineage

    kind, title = TRAINERS.get(type(config).__name__, ("train", "Training"))
    start = config.model.path
    hub_id = _hub_id(start)
    license = None if hub_id else card_license(Path(start))
    # A local start names its Hub origin too: a hub cache folder, a card, a provenance record.
    lineage = [hub_id] if hub_id else hub_lineage(Path(start))
    tags = ["mergekit-rl", kind]
    if kind == "sft" and getattr(getattr(config, "sft", None), "crlft", None) is not None:
        tags.append("c-rlft")
    if kind == "wpo":
        tags += ["dpo"] if not config.wpo.weighting else []
    if adapter:
        tags += ["lora", "peft"]
    data = ModelCardData(library_name="peft" if adapter else "transformers", tags=tags,
                         license=license, base_model=lineage or None,
                         base_model_relation=("adapter" if adapter else "finetune")
                         if lineage else None,
                         datasets=[config.data.path] if _hub_id(config.data.path) else None)
    metrics = state.get("metrics") or {}
    lines = [f"# {kind.upper()} model trained with mergekit-rl", "",
             f"{title}, starting from `{start}`"
             + (f" (revision `{config.model.revision}`)" if config.model.revision else "")
             + f"; data `{config.data.path}`. Step {state.get('step', '?')}.", ""]
    if metrics:
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_metric(v)} |" for k, v in metrics.items()]
        lines += ["", "Every logged step: `metrics.jsonl` in the training output folder.", ""]
    lines += ["## Recipe", "", f"`mergekit-rl train {kind} trainer_config.yaml`:", "", "```yaml",
              yaml.safe_dump(config_dict, sort_keys=False).rstrip(), "```", "",
              "## Usage", "", "```python"]
    if adapter:
        lines += ["from peft import AutoPeftModelForCausalLM",
                  "model = AutoPeftModelForCausalLM.from_pretrained(PATH_OR_REPO)  # base + "
                  "adapter", "model = model.merge_and_unload()  # optional: plain weights"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH_OR_REPO)",
                  "tokenizer = AutoTokenizer.from_pretrained(PATH_OR_REPO)"]
    lines += ["```", ""]
    if kind in ("judge", "pairwise"):
        from .judging import card_lines

        lines += card_lines(config)
    if kind == "grpo":
        lines += ["The reasoning vector of this run is `mergekit-rl extract THIS_MODEL "
                  "SFT_START -o vector`.", ""]
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)).save(directory / "README.md")
