"""The critic of `train pairwise`'s PPO form: a copy of the starting policy's transformer with a
scalar head, reading the prompt, the anchor and the completion so far, V(x, a, y_<t).

Pairwise-RL (https://arxiv.org/abs/2504.04950) discusses a value function consistent with its
anchor-relative reward without publishing it; this one is **ours**. The head starts at
V ≡ ½ (weight 0, bias ½), the value of a tie with the anchor, so that before the critic has
learned anything GAE with γ = λ = 1 gives exactly the `anchor` advantage r − ½. It is trained
on the GAE returns (`losses.pairwise.gae`, `value_loss`) with its own AdamW, in the same
backward as the policy (`rollout.optimise`'s companion), data-parallel like the policy.

Its state (weights and optimizer) is written to `output_dir/critic/step-N.pt` with every
checkpoint of the policy, and read back on resume.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CRITIC_DIR = "critic"


class ValueModel(torch.nn.Module):
    """A causal LM's transformer (no LM head) and a linear scalar head: one value per token."""

    def __init__(self, backbone: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.constant_(self.head.bias, 0.5)  # V ≡ ½: a tie with the anchor

    def forward(self, input_ids, attention_mask, position_ids):  # -> [B, T]
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state
        return self.head(hidden.float()).squeeze(-1)


def critic_prefix(tokenizer, data, prompt, anchor: str, limit: int) -> list[int]:
    """Token ids the critic reads before the completion: the prompt and the anchor in one user
    turn (chat template with the assistant header, or plain text); the last `limit` kept."""
    from .data import render_generation_prompt
    from .judging import question_text

    text = f"{question_text(prompt)}\n\nAnchor response:\n{anchor}"
    rendered = render_generation_prompt(tokenizer, text, data)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"][-limit:]


class Critic:
    """The value model as `rollout.optimise`'s companion: per-piece value loss, its own step."""

    def __init__(self, run, config):
        from transformers import AutoModel

        from . import models, runtime
        from .config import OptimConfig

        params = config.pairwise
        self.run, self.params, self.data = run, params, config.data
        model_cfg = config.model
        backbone = AutoModel.from_pretrained(model_cfg.path, revision=model_cfg.revision,
                                             dtype=getattr(torch, model_cfg.dtype))
        models.disable_dropout(backbone)
        module = ValueModel(backbone, backbone.config.hidden_size).train()
        optim = OptimConfig(lr=params.critic_lr or config.optim.lr, betas=config.optim.betas,
                            eps=config.optim.eps, max_grad_norm=config.optim.max_grad_norm,
                            fused=config.optim.fused)
        optimizer = runtime.make_optimizer(module, optim, run.device)
        self.max_grad_norm = optim.max_grad_norm
        self.model, self.optimizer = run.accelerator.prepare(module, optimizer)
        self.module = run.accelerator.unwrap_model(self.model)
        self.folder = Path(config.train.output_dir) / CRITIC_DIR
        if run.step > 0:
            self.load(run.step)

    # ---- inputs and values -----------------------------------------------------------------
    def attach(self, pieces: list[dict], prefixes: list[list[int]],
               completions: list[list[int]], micro: int, num_tokens: float) -> None:
        """Give each rollout piece the critic's inputs (`critic_*`: prefix | completion, with
        the same completion columns as the policy's piece), its old values, and GAE advantages
        and returns in place of the sequence advantages. `num_tokens`: the global batch's
        completion tokens, the value loss's normaliser."""
        from .losses.pairwise import gae, terminal_rewards
        from .rollout import pad_rollout

        self.num_tokens = num_tokens
        for k, piece in enumerate(pieces):
            part = slice(k * micro, (k + 1) * micro)
            batch = pad_rollout(prefixes[part], completions[part], self.run.tokenizer.pad_token_id,
                                self.run.device)
            piece.update({f"critic_{name}": v for name, v in batch.items()})
            piece["critic_prefix_width"] = max(len(p) for p in prefixes[part])
            values = self.values(piece, grad=False)
            mask = piece["completion_mask"]
            advantages, returns = gae(terminal_rewards(piece["rewards"], mask), values, mask,
                                      self.params.gamma, self.params.lam)
            piece.update(old_values=values, advantages=advantages, returns=returns)

    def values(self, piece: dict, grad: bool) -> torch.Tensor:
        """V at the position before each completion token (it has seen the prefix and y_<t),
        in the policy piece's columns: [b, T], 0 off the completion."""
        from .logprobs import position_ids_from_mask

        ids, attention = piece["critic_input_ids"], piece["critic_attention_mask"]
        net = self.model if grad else self.module
        with nullcontext() if grad else torch.no_grad(), self.run.accelerator.autocast():
            v = net(ids, attention, position_ids_from_mask(attention))  # [b, Tc]
        # pad_rollout: [pad.. prefix | completion ..pad]; both batches hold the same
        # completions, so they have the same number of completion columns
        completion = ids.shape[1] - piece["critic_prefix_width"]
        columns = piece["input_ids"].shape[1]
        out = torch.zeros(ids.shape[0], columns, device=v.device, dtype=torch.float32)
        out[:, columns - completion:] = v[:, ids.shape[1] - completion - 1:-1].float()
        return out * piece["completion_mask"]

    # ---- the companion protocol of rollout.optimise -------------------------------------------
    def accumulate(self, last: bool):
        return nullcontext() if last else self.run.accelerator.no_sync(self.model)

    def loss(self, piece: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """½(V − R)² over the global batch's tokens; and sums [5] for the metrics: loss,
        Σ(R − V_old)², ΣR, ΣR², tokens (the explained variance of the old values)."""
        from .losses.pairwise import value_loss

        mask = piece["completion_mask"]
        values = self.values(piece, grad=True)
        loss = value_loss(values, piece["returns"], mask, self.num_tokens)
        with torch.no_grad():
            m = mask.float()
            err = ((piece["returns"] - piece["old_values"]) ** 2 * m).sum()
            sums = torch.stack([loss.detach(), err, (piece["returns"] * m).sum(),
                                (piece["returns"] ** 2 * m).sum(), m.sum()])
        return loss, sums

    def update(self, sums: list[float]) -> dict:
        """Clip and step the critic after the policy's step."""
        accelerator = self.run.accelerator
        norm = float(accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)) \
            if self.max_grad_norm is not None else float("nan")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, err, total, squares, tokens = sums
        tokens = max(tokens, 1.0)
        variance = squares / tokens - (total / tokens) ** 2
        return {"value_loss": loss, "critic/grad_norm": norm,
                "critic/explained_variance": 1 - (err / tokens) / variance if variance > 0
                else float("nan")}

    # ---- state -------------------------------------------------------------------------------
    def save(self, step: int, keep: int | None) -> None:
        """Weights and optimizer to critic/step-N.pt, written whole; the oldest pruned."""
        accelerator = self.run.accelerator
        if accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f"step-{step}.pt.tmp"
            torch.save({"model": self.module.state_dict(),
                        "optimizer": self.optimizer.state_dict()}, tmp)
            tmp.replace(self.folder / f"step-{step}.pt")
            saved = sorted(self.folder.glob("step-*.pt"), key=lambda p: int(p.stem[5:]))
            for old in saved[:-keep] if keep else []:
                old.unlink()
        accelerator.wait_for_everyone()

    def load(self, step: int) -> None:
        from .errors import TrainerConfigError

        path = self.folder / f"step-{step}.pt"
        if not path.is_file():
            raise TrainerConfigError(f"--resume: the critic's state for step {step} ({path}) is "
                                     "missing; resume from an earlier checkpoint that has one, or "
                                     "set pairwise.critic: false")
        state = torch.load(path, map_location="cpu")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        log.info("critic restored from %s", path)
