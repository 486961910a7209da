"""`mergekit-rl inspect`, `check` and `compare`: commands that read checkpoints and write
nothing but an optional plot."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .console import errors_to_exit, tool_logging


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), help="Draw per-layer L2 norms to PNG.")
@click.option("--download", is_flag=True,
              help="For a Hub id: download the weights to compute norms (default: headers only).")
@errors_to_exit
def inspect(path, as_json, plot, download):
    """Summarise a model or vector: tensors, dtypes, bytes, per-layer L2 norm and sparsity.
    A Hub id is read header-only (counts, no norms) unless --download."""
    from .inspection import inspect_checkpoint, plot_norms

    tool_logging(False)
    report = inspect_checkpoint(path, download)
    if report.header_only and plot:
        raise click.UsageError("--plot needs the norms: add --download for a Hub input")
    if plot:
        plot_norms(report, plot)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    dtypes = ", ".join(f"{k}×{v}" for k, v in sorted(report.dtypes.items()))
    click.echo(f"{report.path} ({report.kind}): {report.tensors} tensors, "
               f"{report.params:,} parameters, {report.bytes / 1e6:.1f} MB [{dtypes}]")
    if report.header_only:
        click.echo("header-only (a Hub input read by range requests): no norms; --download "
                   "computes them")
    click.echo(f"total L2 norm {report.total.l2:.6g}, sparsity {report.total.sparsity:.2%}")
    click.echo(f"{'group':<12}{'tensors':>8}{'params':>14}{'L2 norm':>14}{'sparsity':>10}")
    for g in report.groups:
        click.echo(f"{g.name:<12}{g.tensors:>8}{g.params:>14,}{g.l2:>14.6g}{g.sparsity:>10.2%}")
    if plot:
        click.echo(f"plot → {plot}")


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--init", is_flag=True, help="Also read a sample of tensors to tell whether the "
              "models share an initialisation (reads tensor data).")
@click.option("--allow-vocab-mismatch", is_flag=True,
              help="Accept vocabularies that differ (as add/merge with the same flag).")
@errors_to_exit
def check(inputs, init, allow_vocab_mismatch):
    """Pre-flight report: can INPUTS (the first is the target; then models, vectors or
    adapters) be combined? From headers and configs only (Hub inputs by range requests):
    architecture, tensors, shapes, dtypes, quantisation, tied embeddings, vocabulary,
    tokenizer and chat template. Exit 0 when they can, 1 with the reasons."""
    from .preflight import check as run

    tool_logging(False)
    report = run(list(inputs), allow_vocab_mismatch, init)
    for line in report.render():
        click.echo(line)
    if not report.ok:
        raise SystemExit(1)


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--base", help="Compare the deltas A − BASE and B − BASE of two models.")
@click.option("--include", multiple=True, metavar="REGEX", help="Only these tensors.")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Leave these tensors out.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--plot", type=click.Path(path_type=Path),
              help="Draw per-layer cosine, sign agreement and norm ratio to PNG.")
@errors_to_exit
def compare(a, b, base, include, exclude, as_json, plot):
    """Per-layer cosine similarity, norm ratio ‖A‖/‖B‖ and sign agreement of two vectors
    (dense, low-rank or adapters), or with --base of two models' deltas; streamed."""
    from .comparison import compare as run
    from .comparison import plot_comparison
    from .plan import Selection

    tool_logging(False)
    c = run(a, b, base, Selection(tuple(include), tuple(exclude)))
    if plot:
        plot_comparison(c, plot)
    if as_json:
        click.echo(json.dumps(c.as_dict(), indent=2))
        return
    t = c.total
    click.echo(f"{a} vs {b}" + (f" (deltas to {base})" if base else "")
               + f": {t.tensors} tensors, {t.params:,} parameters")
    click.echo(f"{'group':<12}{'tensors':>8}{'cosine':>10}{'‖A‖/‖B‖':>10}{'signs agree':>13}")
    for g in [*c.groups, t]:
        click.echo(f"{g.name:<12}{g.tensors:>8}{g.cosine:>10.4f}{g.norm_ratio:>10.4f}"
                   f"{g.sign_agreement:>13.2%}")
    if plot:
        click.echo(f"plot → {plot}")
