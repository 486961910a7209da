"""`mergekit-rl train sft|grpo CONFIG.yaml [--set key=value ...] [--resume [DIR]]`.

`train` is a Click group the main `mergekit-rl` CLI registers with `main.add_command(train)`.
Importing this module is cheap: torch and transformers are imported inside the commands.
The only place in `trainers/` that prints or exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import click

SECTIONS = ("model", "data", "train", "optim", "sft", "grpo")


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(quiet: bool, verbose: bool) -> None:
    main_process = os.environ.get("RANK", "0") == "0"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("trainers")
    logger.handlers[:] = [handler]
    level = logging.DEBUG if verbose else logging.INFO
    logger.setLevel(logging.ERROR if quiet else level if main_process else logging.WARNING)
    logger.propagate = False
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


# Training-only files that stay local when a run is pushed.
PUSH_IGNORE = ("checkpoint-*", "*.tmp", "*.tmp/*", "ref_logps.pt", "runs/*")


def push_option(command):
    command = click.option("--private", is_flag=True,
                           help="Create the --push-to-hub repo as private.")(command)
    return click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", default=None,
                        help="Upload the final model (weights, tokenizer, config, model card) "
                             "to this Hub repo when training ends.")(command)


def push_result(out: Path, repo_id: str | None, private: bool, kind: str, quiet: bool) -> None:
    """Publish a finished run's folder; a failed push leaves the local folder as it is."""
    if not repo_id:
        return
    from mergekit_rl.errors import MergekitRLError
    from mergekit_rl.hub import push

    try:
        result = push(out, repo_id, private=private, ignore=PUSH_IGNORE,
                      commit_message=f"mergekit-rl train {kind}: {Path(out).name}")
    except MergekitRLError as e:
        raise click.ClickException(f"{e} (the model is saved in {out})") from None
    if not quiet:
        click.echo(f"pushed to {result.commit_url}")


@contextlib.contextmanager
def user_errors(config_path: Path, sections: tuple[str, ...] = SECTIONS,
                interrupted: str = "no checkpoint was written for the current step"):
    """Turn what a user can fix into a one-line error naming the config; signals into exits."""
    from .errors import TrainerError, TrainingInterrupted

    try:
        yield
    except TrainingInterrupted as e:
        click.echo(f"interrupted: {e}", err=True)
        sys.exit(128 + int(e.signum))
    except KeyboardInterrupt:
        click.echo(f"interrupted: {interrupted}", err=True)
        sys.exit(128 + signal.SIGINT)
    except (TrainerError, OSError, ImportError, ValueError) as e:
        message = str(e)
        if str(config_path) not in message and message.split(".")[0].split(":")[0] in sections:
            message = f"{config_path}: {message}"
        raise click.ClickException(message) from None


def quiet_config(config, quiet: bool):
    """`--quiet` also switches the progress bar off."""
    if not quiet:
        return config
    import dataclasses

    return dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                 progress_bar=False))


def _run(trainer: str, config_path: Path, overrides: tuple[str, ...], resume: str | None,
         quiet: bool, verbose: bool, push_to_hub: str | None = None,
         private: bool = False) -> None:
    _setup_logging(quiet, verbose)
    with user_errors(config_path):
        from .config import load_config

        if trainer == "sft":
            from .sft import SFTConfig as config_cls
            from .sft import train_sft as run
        else:
            from .grpo import GRPOConfig as config_cls
            from .grpo import train_grpo as run
        out = run(quiet_config(load_config(config_cls, config_path, overrides), quiet),
                  resume=resume)
    if not quiet:
        click.echo(f"{trainer}: model written to {out}")
    push_result(out, push_to_hub, private, trainer, quiet)


def _command(trainer: str, doc: str):
    @click.command(name=trainer, help=doc)
    @click.argument("config", type=click.Path(path_type=Path))
    @click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                  help="Override a config value, e.g. --set optim.lr=2e-5 (repeatable).")
    @click.option("--resume", is_flag=False, flag_value="latest", default=None,
                  metavar="[DIR]",
                  help="Continue from a checkpoint: DIR, or the newest in train.output_dir.")
    @click.option("-q", "--quiet", is_flag=True, help="Errors only; no progress bar.")
    @click.option("-v", "--verbose", is_flag=True, help="Debug logging (and transformers').")
    @push_option
    def command(config, overrides, resume, quiet, verbose, push_to_hub, private):
        _run(trainer, config, overrides, resume, quiet, verbose, push_to_hub, private)

    return command


sft = _command("sft", """Supervised fine-tuning on completions (prompt tokens masked), with
optional C-RLFT class conditioning and weights (sft.crlft).

Writes the model, tokenizer and resolved config to train.output_dir, checkpoint-N/ folders
every train.save_steps, and metrics.jsonl. Ctrl-C or SIGTERM writes a checkpoint first.
Multi-process: torchrun --nproc_per_node N -m trainers.sft CONFIG.""")

grpo = _command("grpo", """GRPO (DeepSeekMath): G sampled completions per prompt, group-relative
advantages, clipped ratio, optional k3 KL to the starting model (grpo.beta).

Rewards (grpo.rewards) are built-ins (exact_answer, format) or module:function callables
(prompts, completions, **columns) -> list[float | None]. Outputs as for `train sft`.""")

train = click.Group("train", help="Train the donor checkpoints (SFT, GRPO) on this machine or "
                                  "data-parallel with torchrun / accelerate launch.",
                    commands=[sft, grpo])

if __name__ == "__main__":
    train()
