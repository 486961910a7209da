"""`mergekit-rl`: the console group and the weight-arithmetic commands (extract, add, subtract,
merge, inspect, push). With `trainers.cli` and `reasoning_demo.cli` the only code that prints
and exits; errors become exit codes by `console.user_errors`. The trainers' `train` / `sample`
and the experiment's `demo` join the group as entry points (`console.PluginGroup`)."""

from __future__ import annotations

import functools
import gc
import json
import shlex
from pathlib import Path

import click

from .console import PluginGroup, errors_to_exit, setup_logging


def _tune_malloc() -> None:
    """Keep freed tensor blocks in the heap for reuse (glibc): without this every block is a
    fresh mmap whose pages fault in again, which cost more than the arithmetic. Process-wide,
    so only the CLI (which owns the process) does it."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: do not hand the heap top back
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
    except (OSError, AttributeError):
        pass  # not glibc: defaults are fine, only slower


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    _tune_malloc()
    # The ~1M objects torch creates at import live as long as the process: out of the garbage
    # collector's sight, its full passes (during a run and at exit) stop re-scanning them.
    gc.freeze()
    setup_logging("mergekit_rl", quiet, verbose)


def _progress_factory(quiet: bool):
    if quiet:
        return None

    def factory(total_bytes: int, total_tensors: int):
        from tqdm.auto import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                   dynamic_ncols=True, disable=None, leave=False)
        done = [0]

        def update(nbytes: int, tensors: int) -> None:
            done[0] += tensors
            bar.set_postfix_str(f"{done[0]}/{total_tensors} tensors", refresh=False)
            bar.update(nbytes)
            if done[0] == total_tensors:
                bar.close()

        return update

    return factory


def common_options(fn, out_required: bool = True):
    """Options shared by the commands that write a checkpoint."""
    opts = [
        click.option("-o", "--out", "out", required=out_required,
                     type=click.Path(path_type=Path),
                     help="Output folder (written atomically)."
                     + ("" if out_required else " Default: the manifest's output.path.")),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     help="Output dtype: auto = the target's for models, float32 for vectors."),
        click.option("--include", multiple=True, metavar="REGEX",
                     help="Only tensors whose name matches (repeatable); the rest come from the "
                          "target unchanged."),
        click.option("--exclude", multiple=True, metavar="REGEX",
                     help="Leave tensors whose name matches unchanged (repeatable)."),
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu, cuda or cuda:N."),
        click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
        click.option("--allow-vocab-mismatch", is_flag=True,
                     help="Combine the common rows of embeddings/lm_head when vocabularies "
                          "differ; the target's extra rows are kept."),
        click.option("--max-shard-size", default="5GB", show_default=True,
                     help="Largest output shard, e.g. 500MB, 2GB."),
        click.option("--threads", type=int, metavar="N",
                     help="CPU compute threads (default: the cores left after the reader and "
                          "writer threads, at least 1)."),
        click.option("--block-size", default="4MiB", show_default=True,
                     help="Rows streamed per step, as fp32 bytes of one input, e.g. 16MiB."),
        click.option("--hash", "full_hash", is_flag=True,
                     help="Record the full sha256 of every input file (reads inputs twice)."),
        click.option("--push-to-hub", metavar="REPO_ID",
                     help="Upload the result to this Hub repo when done."),
        click.option("--private", is_flag=True, help="Create the Hub repo as private."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _options(**kw):
    from .checkpoint import parse_size
    from .job import Options

    sizes = {}
    for key, hint in (("max_shard_size", "--max-shard-size"), ("block_size", "--block-size")):
        try:
            sizes[key] = parse_size(kw[key])
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=hint) from None
    return Options(dtype=kw["dtype"], include=tuple(kw["include"]),
                   exclude=tuple(kw["exclude"]), device=kw["device"],
                   overwrite=kw["overwrite"], allow_vocab_mismatch=kw["allow_vocab_mismatch"],
                   max_shard_size=sizes["max_shard_size"], block_bytes=sizes["block_size"],
                   threads=kw["threads"], full_hash=kw["full_hash"],
                   command=_command_line())


def _command_line() -> str:
    """The invoked command in canonical form (arguments, then options that differ from their
    defaults), for provenance and model cards."""
    ctx = click.get_current_context()
    words = ctx.command_path.split()
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif value not in (param.default, None, ()) and not (param.is_flag and not value):
            flag = max(param.opts, key=len)
            values = value if param.multiple else [value]
            for v in values:
                words += [flag] if param.is_flag else [flag, str(v)]
    return shlex.join(words)


def _summary(result, quiet: bool, what: str, push_to: str | None = None,
             private: bool = False) -> None:
    if not quiet:
        gb = result.bytes_written / 1e9
        click.echo(f"{what}: wrote {result.tensors} tensors ({result.computed} computed), "
                   f"{gb:.3g} GB in {result.seconds:.1f}s on {result.device}"
                   f"{_throughput(result.engine)} → {result.out}")
    if push_to:
        _push(result.out, push_to, private=private)


def _throughput(stats) -> str:
    """`, 7.6 GB through the engine at 5.1 GB/s (busy: read 61%, compute 83%, write 40%)`:
    each stage's busy time over the engine's wall time (compute: per worker), so a stage near
    100% is the bottleneck and compute well below it is hidden behind I/O."""
    if stats is None or not stats.seconds:
        return ""
    share = {k: v / stats.seconds / (stats.threads if k == "compute" else 1)
             for k, v in stats.busy.items()}
    return (f", {(stats.bytes_read + stats.bytes_written) / 1e9:.3g} GB through the engine at "
            f"{stats.gb_per_s:.2f} GB/s (busy: " +
            ", ".join(f"{k} {v:.0%}" for k, v in share.items()) + ")")


def _push(folder, repo_id, **kw) -> None:
    from .hub import push

    r = push(folder, repo_id, **kw)
    if r.skipped:
        click.echo(f"resumed: {len(r.skipped)} files were already on the Hub")
    click.echo(f"pushed {folder} → {r.pr_url or r.commit_url}")


@click.group(name="mergekit-rl", cls=PluginGroup,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekit-rl")
def main():
    """Move abilities between language models by weight arithmetic.

    Task vectors (the reasoning vector θ_GRPO − θ_SFT of Zbeeb et al. 2025), streamed tensor by
    tensor with memory bounded by a few tensors, on a GPU when there is one.
    """


@main.command()
@click.argument("finetuned")
@click.argument("base")
@common_options
@errors_to_exit
def extract(finetuned, base, **kw):
    """Write the task vector FINETUNED − BASE to OUT.

    The reasoning vector is `extract GRPO_CHECKPOINT SFT_CHECKPOINT`. Inputs are local folders
    or Hub ids (org/name[@revision]). The vector is a sharded safetensors checkpoint (float32
    unless --dtype) with provenance.json and a model card.
    """
    from .vectors import extract as run

    _setup_logging(kw["quiet"])
    result = run(finetuned, base, kw["out"], _options(**kw), _progress_factory(kw["quiet"]))
    _summary(result, kw["quiet"], "extract", kw["push_to_hub"], kw["private"])


def _apply_command(subtract: bool):
    def command(target, vector, alpha, **kw):
        from .vectors import apply as run

        _setup_logging(kw["quiet"])
        result = run(target, vector, kw["out"], alpha, _options(**kw),
                     _progress_factory(kw["quiet"]), subtract=subtract)
        _summary(result, kw["quiet"], "subtract" if subtract else "add", kw["push_to_hub"],
                 kw["private"])

    return command


for _name, _sub, _doc in (
    ("add", False, "Write TARGET + ALPHA·VECTOR to OUT (a model: the target's config, tokenizer "
                   "and chat template are copied).\n\nThe paper's transfer is "
                   "`add INSTRUCT REASONING_VECTOR --alpha 1`."),
    ("subtract", True, "Write TARGET − ALPHA·VECTOR to OUT (a model, as for add)."),
):
    _cmd = errors_to_exit(_apply_command(_sub))
    _cmd.__doc__ = _doc
    _cmd = common_options(_cmd)
    _cmd = click.option("--alpha", default=1.0, show_default=True, type=float,
                        help="Scale of the vector.")(_cmd)
    _cmd = click.argument("vector")(_cmd)
    _cmd = click.argument("target")(_cmd)
    main.command(name=_name)(_cmd)


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a manifest value, e.g. --set terms.0.weight=0.5 (repeatable).")
@functools.partial(common_options, out_required=False)
@errors_to_exit
def merge(manifest, dry_run, overrides, **kw):
    """Merge as MANIFEST says: our schema or a mergekit config (task_arithmetic, ties,
    dare_linear, dare_ties, breadcrumbs, linear), in one streaming pass.

    The paper's recipe `instruct + 1.0·(GRPO − SFT)` is one term `{plus: GRPO, minus: SFT}`:
    no intermediate vector on disk. See manifests/ for examples.
    """
    from . import manifest as manifest_mod
    from .merge import dry_run as plan_only
    from .merge import run_merge

    _setup_logging(kw["quiet"])
    m = manifest_mod.load(manifest, list(overrides))
    options = _options(**kw)
    if dry_run:
        for line in plan_only(m, options):
            click.echo(line)
        return
    result = run_merge(m, kw["out"], options, _progress_factory(kw["quiet"]))
    push = m.push or {}
    _summary(result, kw["quiet"], "merge", kw["push_to_hub"] or push.get("repo_id"),
             kw["private"] or bool(push.get("private", False)))


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", help="Branch to push to (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option("--commit-message", "-m", help="Commit message.")
@click.option("--repo-type", default="model", show_default=True,
              type=click.Choice(["model", "dataset"]))
@errors_to_exit
def push(folder, repo_id, private, revision, create_pr, commit_message, repo_type):
    """Upload FOLDER (a merge, vector or checkpoint) to the Hub repo REPO_ID.

    The repo is created if needed. Folders over 50 GB go up in several commits, and a
    rerun skips files the Hub already has. The token comes from HF_TOKEN or `hf auth login`
    and is never printed.
    """
    _setup_logging(False)
    _push(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
          commit_message=commit_message, repo_type=repo_type)


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), help="Draw per-layer L2 norms to PNG.")
@errors_to_exit
def inspect(path, as_json, plot):
    """Summarise a model or vector: tensors, dtypes, bytes, per-layer L2 norm and sparsity."""
    from .inspection import inspect_checkpoint, plot_norms

    _setup_logging(False)
    report = inspect_checkpoint(path)
    if plot:
        plot_norms(report, plot)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    dtypes = ", ".join(f"{k}×{v}" for k, v in sorted(report.dtypes.items()))
    click.echo(f"{report.path} ({report.kind}): {report.tensors} tensors, "
               f"{report.params:,} parameters, {report.bytes / 1e6:.1f} MB [{dtypes}]")
    click.echo(f"total L2 norm {report.total.l2:.6g}, sparsity {report.total.sparsity:.2%}")
    click.echo(f"{'group':<12}{'tensors':>8}{'params':>14}{'L2 norm':>14}{'sparsity':>10}")
    for g in report.groups:
        click.echo(f"{g.name:<12}{g.tensors:>8}{g.params:>14,}{g.l2:>14.6g}{g.sparsity:>10.2%}")
    if plot:
        click.echo(f"plot → {plot}")


if __name__ == "__main__":
    main()
