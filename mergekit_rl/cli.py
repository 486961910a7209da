"""`mergekit-rl`: the console group and the weight-arithmetic commands (extract, add, subtract,
merge, inspect, push). With `trainers.cli` and `reasoning_demo.cli` the only code that prints
and exits; errors become exit codes by `console.user_errors`. The trainers' `train` / `sample`
and the experiment's `demo` join the group as entry points (`console.PluginGroup`)."""

from __future__ import annotations

import functools
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

    try:
        shard = parse_size(kw["max_shard_size"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-shard-size") from None
    return Options(dtype=kw["dtype"], include=tuple(kw["include"]),
                   exclude=tuple(kw["exclude"]), device=kw["device"],
                   overwrite=kw["overwrite"], allow_vocab_mismatch=kw["allow_vocab_mismatch"],
                   max_shard_size=shard, full_hash=kw["full_hash"],
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
             private: bool = False, local_paths: bool = False) -> None:
    if not quiet:
        gb = result.bytes_written / 1e9
        click.echo(f"{what}: wrote {result.tensors} tensors ({result.computed} computed), "
                   f"{gb:.3g} GB in {result.seconds:.1f}s on {result.device} → {result.out}")
    if push_to:
        _push(result.out, push_to, kept=True, private=private, local_paths=local_paths)


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

    _setup_logging(kw["quiet"])
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

    _setup_logging(kw["quiet"])
    result = run(vector, kw["out"], _lowrank(kw, required=True), _options(**kw))
    _summary(result, kw["quiet"], "compress", kw["push_to_hub"], kw["private"],
             kw["card_local_paths"])


def _apply_command(subtract: bool):
    def command(target, vector, alpha, **kw):
        from .vectors import apply as run

        _setup_logging(kw["quiet"])
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

    _setup_logging(kw["quiet"])
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
    _setup_logging(False)
    record = None
    if eval_file is not None:
        from .evaluation import read_record

        record = read_record(eval_file)
    _push(folder, repo_id, local_paths=card_local_paths, eval_record=record, private=private,
          revision=revision, create_pr=create_pr, commit_message=commit_message,
          repo_type=repo_type)


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


@main.command(name="eval")
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

    _setup_logging(kw["quiet"])
    _quiet_libraries(kw["quiet"])
    rec, text = evaluate(model, _make_eval_options(kw), out, kw["device"], update_card,
                         kw["overwrite"])
    click.echo(text)
    if out is not None:
        click.echo(f"eval: {len(rec['results'])} results → {out / 'eval.json'}")
    if update_card:
        click.echo(f"eval: model-index added to {Path(model) / 'README.md'}")


@main.command()
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

    _setup_logging(kw["quiet"])
    _quiet_libraries(kw["quiet"])
    try:
        shard = parse_size(kw["max_shard_size"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-shard-size") from None
    values = parse_alphas(alphas)
    options = Options(dtype=kw["dtype"], include=tuple(kw["include"]),
                      exclude=tuple(kw["exclude"]), device=kw["device"],
                      overwrite=kw["overwrite"], allow_vocab_mismatch=kw["allow_vocab_mismatch"],
                      max_shard_size=shard, command=_command_line())

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


@main.command()
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

    _setup_logging(False)
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


@main.command()
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

    _setup_logging(False)
    report = run(list(inputs), allow_vocab_mismatch, init)
    for line in report.render():
        click.echo(line)
    if not report.ok:
        raise SystemExit(1)


@main.command()
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

    _setup_logging(False)
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


if __name__ == "__main__":
    main()
