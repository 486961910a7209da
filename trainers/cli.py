"""`mergekit-rl train sft|grpo|wpo|judge|pairwise CONFIG` and `mergekit-rl sample pairs|rso CONFIG`.

Two Click groups that `mergekit-rl` loads as entry points (`mergekit_rl.console.PluginGroup`);
`python -m trainers train grpo CONFIG` runs the same commands where a launcher needs a module
(`torchrun --nproc_per_node 2 -m trainers train grpo CONFIG`). Importing this module is cheap:
torch and transformers are imported inside the commands. The only place in `trainers/` that
prints or exits; errors become exit codes by the tool's one policy (`console.user_errors`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import click

from mergekit_rl.console import setup_logging, user_errors

# Top-level config keys: a message about one of them is prefixed with the config file.
SECTIONS = ("model", "data", "train", "optim", "sft", "grpo", "wpo", "judge", "pairwise", "reward",
            "generation", "pairs", "rso", "output", "seed", "overwrite")
# Training-only files that stay local when a run is pushed.
PUSH_IGNORE = ("checkpoint-*", "*.tmp", "*.tmp/*", "ref_logps.pt", "runs/*", "critic/*",
               "greedy_anchors.json")


def _setup_logging(quiet: bool, verbose: bool) -> None:
    import logging

    setup_logging("trainers", quiet, verbose, default=logging.INFO,
                  main_process=os.environ.get("RANK", "0") == "0")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _quiet(config, quiet: bool):
    """`--quiet` also switches the progress bar off."""
    if not quiet or not hasattr(config, "train"):
        return config
    return dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                 progress_bar=False))


def _push(out: Path, repo_id: str | None, private: bool, kind: str, quiet: bool) -> None:
    """Publish a finished run's folder; a failed push leaves the local folder as it is."""
    if not repo_id:
        return
    from mergekit_rl.errors import MergekitRLError
    from mergekit_rl.hub import push

    try:
        result = push(out, repo_id, private=private, ignore=PUSH_IGNORE,
                      commit_message=f"mergekit-rl train {kind}: {Path(out).name}")
    except MergekitRLError as e:
        raise click.ClickException(
            f"{e} (the model is saved in {out}; push it later with `mergekit-rl push {out} "
            f"{repo_id}`)") from None
    if not quiet:
        click.echo(f"pushed to {result.commit_url}")


def _common(command, example: str):
    command = click.option("-v", "--verbose", is_flag=True,
                           help="Debug logging (and transformers').")(command)
    command = click.option("-q", "--quiet", is_flag=True,
                           help="Errors only; no progress bar.")(command)
    command = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                           help=f"Override a config value, e.g. --set {example} "
                                "(repeatable).")(command)
    return click.argument("config", type=click.Path(path_type=Path))(command)


def _train_command(kind: str, doc: str) -> click.Command:
    @click.command(name=kind, help=doc)
    @functools.partial(_common, example="optim.lr=2e-5")
    @click.option("--resume", is_flag=False, flag_value="latest", default=None,
                  metavar="[DIR]",
                  help="Continue from a checkpoint: DIR, or the newest in train.output_dir.")
    @click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", default=None,
                  help="Upload the final model (weights, tokenizer, config, model card) to this "
                       "Hub repo when training ends.")
    @click.option("--private", is_flag=True, help="Create the --push-to-hub repo as private.")
    @click.option("--dry-run", is_flag=True,
                  help="Check the config and data, print the batch arithmetic and a memory "
                       "estimate per process, and stop; no weights are loaded.")
    def command(config, overrides, quiet, verbose, resume, push_to_hub, private, dry_run):
        _setup_logging(quiet, verbose)
        with user_errors("no checkpoint was written for the current step", config, SECTIONS):
            from . import registry
            from .scaffold import DryRunComplete
            from .scaffold import dry_run as dry_run_mode

            loaded = _quiet(registry.load(kind, config, overrides), quiet)
            if dry_run:
                with dry_run_mode():
                    try:
                        registry.run(kind, loaded, resume=resume)
                    except DryRunComplete as done:
                        click.echo(done.report)
                        return
                raise RuntimeError(f"train {kind} returned without calling Run.start")
            out = registry.run(kind, loaded, resume=resume)
        if not quiet:
            click.echo(f"{kind}: model written to {out}")
        _push(out, push_to_hub, private, kind, quiet)

    return command


def _sample_command(kind: str, doc: str) -> click.Command:
    @click.command(name=kind, help=doc)
    @functools.partial(_common, example="generation.temperature=0.7")
    def command(config, overrides, quiet, verbose):
        _setup_logging(quiet, verbose)
        with user_errors("the output file was not written", config, SECTIONS):
            from . import registry

            out = registry.run(kind, registry.load(kind, config, overrides))
        if not quiet:
            click.echo(f"{kind}: pairs written to {out}")

    return command


sft = _train_command("sft", """Supervised fine-tuning on completions (prompt tokens masked), with
optional C-RLFT class conditioning and weights (sft.crlft).

Writes the model, tokenizer and resolved config to train.output_dir, checkpoint-N/ folders
every train.save_steps, and metrics.jsonl. Ctrl-C or SIGTERM writes a checkpoint first.
Multi-process: torchrun --nproc_per_node N -m trainers train sft CONFIG.""")

grpo = _train_command("grpo", """GRPO (DeepSeekMath): G sampled completions per prompt,
group-relative advantages, clipped ratio, optional k3 KL to the starting model (grpo.beta).

Rewards (grpo.rewards) are built-ins (exact_answer, format) or module:function callables
(prompts, completions, **columns) -> list[float | None]. Outputs as for `train sft`.""")

wpo = _train_command("wpo", """Preference optimisation with WPO weighting (arXiv 2406.11827)
over the DPO family.

wpo.loss_type: sigmoid (DPO, cDPO with wpo.label_smoothing), robust, ipo, hinge (RSO
hinge-norm; SLiC with wpo.reference_free), copg (needs chosen_reward/rejected_reward).
wpo.weighting multiplies each pair's loss by w(x,y_w)·w(x,y_l) (wpo.weight_alignment,
wpo.weight_clamp). Rows: prompt, chosen, rejected (strings or chat messages), e.g. the
output of `mergekit-rl sample pairs`. Reference log-probs are computed once and cached in
train.output_dir. Outputs as for `train sft`; Ctrl-C or SIGTERM writes a checkpoint first.""")

judge = _train_command("judge", """A generative pairwise judge (Pairwise-RL, arXiv 2504.04950;
design reconstructed from the abstract, GenRM and pair-pm: ours).

Reads "Question / Response A / Response B / Is Response A better than Response B?" and
answers with one token (judge.labels, default Yes/No, checked to be single tokens). Both
orders of every pair are in the same batch; judge.loss two_way (softmax over the two labels)
or full_vocab (GenRM's cross-entropy); judge.consistency_weight penalises p(a≻b) + p(b≻a) ≠ 1.
Held-out pairwise accuracy and position consistency go to metrics.jsonl, judge_eval.json and
the model card. Rows: prompt, chosen, rejected (e.g. the output of `sample pairs`).""")

pairwise = _train_command("pairwise", """Pairwise-RL's policy step (arXiv 2504.04950; our
reconstruction): reward P̄(y ≻ anchor) from a `train judge` judge.

G samples per prompt; pairwise.anchor reference (the row's pairwise.anchor_field, default),
greedy (the starting policy's greedy response, computed once and cached) or group (a random
member of the group); clipped ratio (epsilon, epsilon_high), k3 KL (beta); pairwise.advantage
anchor (r − ½) or group (GRPO normalisation); pairwise.critic adds a value model trained with
GAE (gamma, lam). Batch rule and outputs as for `train grpo`.""")

pairs = _sample_command("pairs", """On-policy or hybrid preference pairs (WPO's best setting,
arXiv 2406.11827).

Samples generation.num_samples completions per prompt from model.path, scores them with
reward.function (a rule: built-in or module:function), reward.model (a local
sequence-classification reward model) or reward.judge (a `train judge` folder: P̄(y ≻ the
row's reward.anchor_field, or the policy's greedy response)); chosen = best, rejected =
lowest (pairs.rejected: random). pairs.mode hybrid adds the row's own answers
(pairs.off_policy_fields) to the candidates. Writes JSONL that `train wpo` reads.""")

rso = _sample_command("rso", """RSO statistical rejection sampling (arXiv 2309.06657) into
preference pairs.

Samples generation.num_samples candidates per prompt (paper: 64, temperature 0.7, top-k
40), scores them, accepts rso.num_accepted (paper: 8) without replacement with probability
exp((r − r_max)/rso.beta), and pairs them (rso.pairing: first_round or tournament).
Train on the output with `train wpo` and wpo.loss_type hinge or sigmoid (β = γ = 0.05).""")

train = click.Group("train", help="Train the donor checkpoints (SFT, GRPO, WPO, Pairwise-RL) and "
                                  "pairwise judges on this machine or data-parallel with torchrun "
                                  "/ accelerate launch.",
                    commands=[sft, grpo, wpo, judge, pairwise])

sample = click.Group("sample", help="Make preference pairs by sampling from a policy and "
                                    "scoring with a reward (WPO hybrid pairs, RSO).",
                     commands=[pairs, rso])
