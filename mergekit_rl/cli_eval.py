"""`mergekit-rl eval` and `mergekit-rl sweep`: lm-evaluation-harness on a model, and on
TARGET + α·VECTOR for each α in memory (the library code is `evaluation`, `sweep`, `inmemory`)."""

from __future__ import annotations

from pathlib import Path

import click

from .console import command_line, errors_to_exit, tool_logging


def _eval_options(fn):
    """lm-eval's options, shared by `eval` and `sweep`."""
    opts = [
        click.option("--tasks", required=True, metavar="TASK[,TASK..]",
                     help="lm-eval tasks, groups or tags, e.g. gsm8k,arc_easy."),
        click.option("--limit", type=float, help="At most N examples per task (a fraction "
                     "below 1: that share); for quick looks, as in lm-eval."),
        click.option("--batch-size", default="1", show_default=True,
                     help="lm-eval batch size: a number, or auto."),
        click.option("--num-fewshot", type=int, help="Few-shot examples (default: the task's)."),
        click.option("--apply-chat-template", is_flag=True,
                     help="Render prompts with the tokenizer's chat template."),
        click.option("--include-path", multiple=True, metavar="DIR",
                     type=click.Path(path_type=Path),
                     help="Folder of your own lm-eval task YAMLs (repeatable)."),
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu, cuda or cuda:N."),
        click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
        click.option("-q", "--quiet", is_flag=True, help="Only the results."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _make_eval_options(kw):
    from .evaluation import EvalOptions, parse_tasks

    limit = kw["limit"]
    if limit is not None and limit >= 1 and float(limit).is_integer():
        limit = int(limit)  # lm-eval: an int is a count, a float below 1 a share
    batch = kw["batch_size"]
    return EvalOptions(tasks=parse_tasks(kw["tasks"]), limit=limit,
                       batch_size=int(batch) if batch.isdigit() else batch,
                       num_fewshot=kw["num_fewshot"],
                       apply_chat_template=kw["apply_chat_template"],
                       include_path=tuple(str(p) for p in kw["include_path"]))


def _quiet_libraries(quiet: bool) -> None:
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # e.g. "pretrained is not a str"
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:
            pass


@click.command(name="eval")
@click.argument("model")
@_eval_options
@click.option("-o", "--out", "out", type=click.Path(path_type=Path),
              help="Write OUT/eval.json (task, metric, value, stderr, n, versions, hashes).")
@click.option("--update-card", is_flag=True,
              help="Add the results to MODEL's README.md model-index (a local folder only).")
@errors_to_exit
def eval_command(model, out, update_card, **kw):
    """Evaluate MODEL (a local folder or Hub id) with lm-evaluation-harness.

    Prints lm-eval's table. MODEL is never modified, except that --update-card adds the
    results to its model card's `model-index`, in the Hub's format. Needs the extra:
    pip install 'mergekit-rl[eval]'.
    """
    from .evaluation import evaluate

    tool_logging(kw["quiet"])
    _quiet_libraries(kw["quiet"])
    rec, text = evaluate(model, _make_eval_options(kw), out, kw["device"], update_card,
                         kw["overwrite"])
    click.echo(text)
    if out is not None:
        click.echo(f"eval: {len(rec['results'])} results → {out / 'eval.json'}")
    if update_card:
        click.echo(f"eval: model-index added to {Path(model) / 'README.md'}")


@click.command()
@click.argument("target")
@click.argument("vector")
@click.option("--alphas", default="-1,-0.5,0,0.5,1,1.5", show_default=True,
              help="Values of α, separated by commas.")
@_eval_options
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Write OUT/sweep.json and OUT/sweep.png (atomically).")
@click.option("--save-best", type=click.Path(path_type=Path), metavar="DIR",
              help="Write the best α's model to DIR, as `add --alpha BEST` does.")
@click.option("--include", multiple=True, metavar="REGEX", help="As for add (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="As for add (repeatable).")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Dtype of the evaluated weights, as add's output dtype.")
@click.option("--allow-vocab-mismatch", is_flag=True, help="As for add.")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest shard of --save-best's model.")
@errors_to_exit
def sweep(target, vector, alphas, out, save_best, **kw):
    """Evaluate TARGET + α·VECTOR for each α with lm-eval, without writing checkpoints.

    TARGET is loaded once (on the GPU when there is one); each α's weights are computed from
    TARGET's own tensors and the streamed VECTOR exactly as `add` computes them (bit for bit),
    evaluated, and the target is restored at the end. Writes OUT/sweep.json and OUT/sweep.png.
    The best α is decided by the first task's first metric.
    """
    from .checkpoint import parse_size
    from .job import Options
    from .sweep import parse_alphas, run_sweep, summary

    tool_logging(kw["quiet"])
    _quiet_libraries(kw["quiet"])
    try:
        shard = parse_size(kw["max_shard_size"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-shard-size") from None
    values = parse_alphas(alphas)
    options = Options(dtype=kw["dtype"], include=tuple(kw["include"]),
                      exclude=tuple(kw["exclude"]), device=kw["device"],
                      overwrite=kw["overwrite"], allow_vocab_mismatch=kw["allow_vocab_mismatch"],
                      max_shard_size=shard, command=command_line())

    def on_point(alpha, rows, seconds):
        if not kw["quiet"] and rows:
            r = rows[0]
            err = "" if r["stderr"] is None else f" ± {r['stderr']:.4f}"
            click.echo(f"alpha {alpha:g}: {r['task']} {r['metric']} {r['value']:.4f}{err} "
                       f"({seconds:.1f}s)")

    result = run_sweep(target, vector, out, values, _make_eval_options(kw), options, save_best,
                       on_point)
    for line in summary(result.record):
        click.echo(line)
    click.echo(f"sweep: {out / 'sweep.json'}, {out / 'sweep.png'}"
               + (f"; best model → {result.saved}" if result.saved else ""))
