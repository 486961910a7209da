"""`mergekit-rl`: the console group and the commands that write checkpoints (extract, compress,
add, subtract, merge) or publish them (push); `cli_read` adds inspect, check and compare,
`cli_eval` eval and sweep. With `trainers.cli` and `reasoning_demo.cli` the only code that prints
and exits; errors become exit codes by `console.user_errors`. The trainers' `train` / `sample`
and the experiment's `demo` join the group as entry points (`console.PluginGroup`)."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from .cli_eval import eval_command, sweep
from .cli_read import check, compare, inspect
from .console import PluginGroup, command_line, errors_to_exit, tool_logging


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


def common_options(fn, out_required: bool = True, makes_vector: bool = False):
    """Options shared by the commands that write a checkpoint (`makes_vector`: extract, whose
    mask leaves tensors out of the vector instead of keeping the target's)."""
    rest = ("the others are left out of the vector (add then keeps the target's)"
            if makes_vector else "the rest come from the target unchanged")
    opts = [
        click.option("-o", "--out", "out", required=out_required,
                     type=click.Path(path_type=Path),
                     help="Output folder (written atomically)."
                     + ("" if out_required else " Default: the manifest's output.path.")),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     help="Output dtype: auto = the target's for models, float32 for vectors."),
        click.option("--include", multiple=True, metavar="REGEX",
                     help=f"Only tensors whose name matches (re.search; repeatable); {rest}."
                     + ("" if makes_vector or out_required else " Combined with the "
                        "manifest's include/exclude: a tensor is merged when both select it.")),
        click.option("--exclude", multiple=True, metavar="REGEX",
                     help=("Leave tensors whose name matches out of the vector (repeatable)."
                           if makes_vector else
                           "Leave tensors whose name matches unchanged (repeatable).")),
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
        click.option("--card-local-paths", is_flag=True,
                     help="Publish absolute local paths in the pushed card and provenance "
                          "(default: folder names only)."),
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
                   command=command_line())


def _summary(result, quiet: bool, what: str, push_to: str | None = None,
             private: bool = False, local_paths: bool = False) -> None:
    if not quiet:
        gb = result.bytes_written / 1e9
        click.echo(f"{what}: wrote {result.tensors} tensors ({result.computed} computed), "
                   f"{gb:.3g} GB in {result.seconds:.1f}s on {result.device}"
                   f"{_throughput(result.engine)} → {result.out}")
    if push_to:
        _push(result.out, push_to, kept=True, private=private, local_paths=local_paths)


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


def _push(folder, repo_id, kept: bool = False, local_paths: bool = False,
          eval_record: dict | None = None, **kw) -> None:
    """Upload a folder as it is published (`provenance.staged_for_push`); `kept`: it was just
    written, so a failure says it is kept locally; `eval_record`: results for the card."""
    from .errors import HubError
    from .hub import push
    from .provenance import staged_for_push

    kw["commit_message"] = kw.get("commit_message") or f"Upload {Path(folder).name} with " \
        "mergekit-rl"
    try:
        with staged_for_push(Path(folder), repo_id, local_paths) as staged:
            readme = None
            if eval_record is not None:
                from .provenance import card_with_eval

                card = Path(staged) / "README.md"
                readme = card_with_eval(card.read_text() if card.is_file() else None,
                                        eval_record, repo_id.split("/")[-1])
            r = push(staged, repo_id, readme=readme, **kw)
    except HubError as e:
        if not kept:
            raise
        raise HubError(f"{e} (the output is kept in {folder}; push it later with "
                       f"`mergekit-rl push {folder} {repo_id}`)") from None
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


def lowrank_options(fn):
    """--rank / --energy / --svd: a low-rank vector in PEFT's LoRA format."""
    for opt in reversed([
        click.option("--rank", type=int, help="Store each 2-D delta as a rank-R truncated SVD "
                     "in PEFT LoRA format (adapter_config.json + adapter_model.safetensors)."),
        click.option("--energy", type=float, help="Instead of --rank: per tensor, the smallest "
                     "rank keeping this fraction of ‖Δ‖² (e.g. 0.99)."),
        click.option("--svd", default="auto", show_default=True,
                     type=click.Choice(["auto", "exact", "randomized"]),
                     help="auto: exact SVD for small tensors, seeded randomized SVD above."),
    ]):
        fn = opt(fn)
    return fn


def _lowrank(kw, required: bool = False):
    if kw["rank"] is None and kw["energy"] is None and not required:
        return None
    from .lowrank import LowRank

    return LowRank(rank=kw["rank"], energy=kw["energy"], svd=kw["svd"])


@main.command()
@click.argument("finetuned")
@click.argument("base")
@functools.partial(common_options, makes_vector=True)
@lowrank_options
@errors_to_exit
def extract(finetuned, base, **kw):
    """Write the task vector FINETUNED − BASE to OUT.

    The reasoning vector is `extract GRPO_CHECKPOINT SFT_CHECKPOINT`. Inputs are local folders
    or Hub ids (org/name[@revision]). The vector is a sharded safetensors checkpoint (float32
    unless --dtype) with provenance.json and a model card; with --rank or --energy a low-rank
    vector that peft loads as a LoRA adapter. FINETUNED may be a PEFT adapter: the vector is
    then scaling·B·A per adapted tensor and zero elsewhere.
    """
    from .vectors import extract as run

    tool_logging(kw["quiet"])
    lowrank = _lowrank(kw)
    result = run(finetuned, base, kw["out"], _options(**kw), _progress_factory(kw["quiet"]),
                 lowrank=lowrank)
    _summary(result, kw["quiet"], "extract", kw["push_to_hub"], kw["private"],
             kw["card_local_paths"])


@main.command()
@click.argument("vector")
@common_options
@lowrank_options
@errors_to_exit
def compress(vector, **kw):
    """Write VECTOR (dense or low-rank) as a low-rank vector: --rank R or --energy E."""
    from .vectors import compress as run

    tool_logging(kw["quiet"])
    result = run(vector, kw["out"], _lowrank(kw, required=True), _options(**kw))
    _summary(result, kw["quiet"], "compress", kw["push_to_hub"], kw["private"],
             kw["card_local_paths"])


def _apply_command(subtract: bool):
    def command(target, vector, alpha, **kw):
        from .vectors import apply as run

        tool_logging(kw["quiet"])
        result = run(target, vector, kw["out"], alpha, _options(**kw),
                     _progress_factory(kw["quiet"]), subtract=subtract)
        _summary(result, kw["quiet"], "subtract" if subtract else "add", kw["push_to_hub"],
                 kw["private"], kw["card_local_paths"])

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
    dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, linear), in one streaming pass.

    The paper's recipe `instruct + 1.0·(GRPO − SFT)` is one term `{plus: GRPO, minus: SFT}`:
    no intermediate vector on disk. Paths in the manifest are relative to its folder; -o and
    paths given with --set are relative to the working directory. See manifests/ for examples.
    """
    from . import manifest as manifest_mod
    from .merge import dry_run as plan_only
    from .merge import run_merge

    tool_logging(kw["quiet"])
    m = manifest_mod.load(manifest, list(overrides))
    for note in m.notes:
        click.echo(f"info: {note}", err=True)
    options = _options(**kw)
    if dry_run:
        for line in plan_only(m, options, kw["out"]):
            click.echo(line)
        return
    result = run_merge(m, kw["out"], options, _progress_factory(kw["quiet"]))
    push = m.push or {}
    _summary(result, kw["quiet"], "merge", kw["push_to_hub"] or push.get("repo_id"),
             kw["private"] or bool(push.get("private", False)), kw["card_local_paths"])


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", help="Branch to push to (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option("--commit-message", "-m", help="Commit message.")
@click.option("--repo-type", default="model", show_default=True,
              type=click.Choice(["model", "dataset"]))
@click.option("--eval", "eval_file", type=click.Path(path_type=Path),
              help="Add the results in this eval.json (`mergekit-rl eval -o OUT`) to the "
                   "uploaded card's model-index; FOLDER itself is not changed.")
@click.option("--card-local-paths", is_flag=True,
              help="Publish absolute local paths in the card and provenance (default: folder "
                   "names only).")
@errors_to_exit
def push(folder, repo_id, private, revision, create_pr, commit_message, repo_type, eval_file,
         card_local_paths):
    """Upload FOLDER (a merge, vector or checkpoint) to the Hub repo REPO_ID.

    The repo is created if needed. Folders over 50 GB go up in several commits, and a
    rerun skips files the Hub already has. The token comes from HF_TOKEN or `hf auth login`
    and is never printed.
    """
    tool_logging(False)
    record = None
    if eval_file is not None:
        from .evaluation import read_record

        record = read_record(eval_file)
    _push(folder, repo_id, local_paths=card_local_paths, eval_record=record, private=private,
          revision=revision, create_pr=create_pr, commit_message=commit_message,
          repo_type=repo_type)




for _command in (eval_command, sweep, inspect, check, compare):
    main.add_command(_command)

if __name__ == "__main__":
    main()
