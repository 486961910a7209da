"""`mergekit-rl train wpo CONFIG` and `mergekit-rl sample pairs|rso CONFIG`.

`wpo` is a command the main CLI adds to the `train` group; `sample` is a group of its own.
Importing this module is cheap: torch and transformers are imported inside the commands.
Like `trainers.cli`, the only place here that prints or exits.
"""

from __future__ import annotations

from pathlib import Path

import click

from .cli import _setup_logging, push_option, push_result, quiet_config, user_errors

SECTIONS = ("model", "data", "train", "optim", "wpo", "reward", "generation", "pairs", "rso",
            "output", "seed", "overwrite")


def _common(command):
    command = click.option("-v", "--verbose", is_flag=True,
                           help="Debug logging (and transformers').")(command)
    command = click.option("-q", "--quiet", is_flag=True, help="Errors only.")(command)
    command = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                           help="Override a config value, e.g. --set wpo.beta=0.01 "
                                "(repeatable).")(command)
    return click.argument("config", type=click.Path(path_type=Path))(command)


@click.command(name="wpo")
@_common
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[DIR]",
              help="Continue from a checkpoint: DIR, or the newest in train.output_dir.")
@push_option
def wpo(config, overrides, quiet, verbose, resume, push_to_hub, private):
    """Preference optimisation with WPO weighting (arXiv 2406.11827) over the DPO family.

    wpo.loss_type: sigmoid (DPO, cDPO with wpo.label_smoothing), robust, ipo, hinge (RSO
    hinge-norm; SLiC with wpo.reference_free), copg (needs chosen_reward/rejected_reward).
    wpo.weighting multiplies each pair's loss by w(x,y_w)·w(x,y_l) (wpo.weight_alignment,
    wpo.weight_clamp). Rows: prompt, chosen, rejected (strings or chat messages), e.g. the
    output of `mergekit-rl sample pairs`. Reference log-probs are computed once and cached in
    train.output_dir. Outputs as for `train sft`; Ctrl-C or SIGTERM writes a checkpoint first.
    """
    _setup_logging(quiet, verbose)
    with user_errors(config, SECTIONS):
        from .config import load_config
        from .wpo import WPOConfig, train_wpo

        out = train_wpo(quiet_config(load_config(WPOConfig, config, overrides), quiet),
                        resume=resume)
    if not quiet:
        click.echo(f"wpo: model written to {out}")
    push_result(out, push_to_hub, private, "wpo", quiet)


def _sample(kind: str, config: Path, overrides, quiet: bool, verbose: bool) -> None:
    _setup_logging(quiet, verbose)
    with user_errors(config, SECTIONS, interrupted="the output file was not written"):
        from .sampling import (
            SamplePairsConfig,
            SampleRSOConfig,
            load_sample_config,
            sample_pairs,
            sample_rso,
        )

        if kind == "pairs":
            out = sample_pairs(load_sample_config(SamplePairsConfig, config, overrides))
        else:
            out = sample_rso(load_sample_config(SampleRSOConfig, config, overrides))
    if not quiet:
        click.echo(f"{kind}: pairs written to {out}")


@click.command(name="pairs")
@_common
def pairs(config, overrides, quiet, verbose):
    """On-policy or hybrid preference pairs (WPO's best setting, arXiv 2406.11827).

    Samples generation.num_samples completions per prompt from model.path, scores them with
    reward.function (a rule: built-in or module:function) or reward.model (a local
    sequence-classification reward model); chosen = best, rejected = lowest (pairs.rejected:
    random). pairs.mode hybrid adds the row's own answers (pairs.off_policy_fields) to the
    candidates. Writes JSONL that `train wpo` reads.
    """
    _sample("pairs", config, overrides, quiet, verbose)


@click.command(name="rso")
@_common
def rso(config, overrides, quiet, verbose):
    """RSO statistical rejection sampling (arXiv 2309.06657) into preference pairs.

    Samples generation.num_samples candidates per prompt (paper: 64, temperature 0.7, top-k
    40), scores them, accepts rso.num_accepted (paper: 8) without replacement with probability
    exp((r − r_max)/rso.beta), and pairs them (rso.pairing: first_round or tournament).
    Train on the output with `train wpo` and wpo.loss_type hinge or sigmoid (β = γ = 0.05).
    """
    _sample("rso", config, overrides, quiet, verbose)


sample = click.Group("sample", help="Make preference pairs by sampling from a policy and "
                                    "scoring with a reward (WPO hybrid pairs, RSO).",
                     commands=[pairs, rso])

if __name__ == "__main__":
    sample()
