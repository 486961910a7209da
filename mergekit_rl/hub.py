"""The one module that talks to the network: the Hugging Face Hub, through huggingface_hub.

Inputs given as `org/name[@revision]` are resolved to a local snapshot holding only what we need:
the safetensors weights (or legacy `.bin` when a repo has nothing else), the index, config,
tokenizer and chat template. The endpoint comes from `HF_ENDPOINT`, the token from `HF_TOKEN` or
the huggingface_hub login, offline mode from `HF_HUB_OFFLINE`, as everywhere in the ecosystem.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import ADAPTER_CONFIG, INDEX_NAME, SIDE_FILES, SINGLE_NAME
from .errors import HubError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
LEGACY_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
# Beside the weights and SIDE_FILES: the card (for its license, never copied into outputs), a
# vector's provenance (its mask says which tensors it lacks on purpose), a PEFT adapter's config.
EXTRA_FILES = ["README.md", "provenance.json", ADAPTER_CONFIG]


@dataclass(frozen=True)
class Source:
    """Where an input came from: a local folder, or a Hub repo at a resolved commit."""

    spec: str                   # what the user typed
    path: Path                  # local folder with the files
    repo_id: str | None = None
    revision: str | None = None  # what the user asked for (branch, tag or sha)
    commit: str | None = None    # the commit it resolved to
    # Header-only (check, inspect, merge --dry-run): `path` holds the small files; the weight
    # files listed here are read by HTTP range requests (`remote_weights`).
    weight_files: tuple[str, ...] | None = None

    @property
    def header_only(self) -> bool:
        return self.weight_files is not None

    def record(self) -> dict:
        if self.repo_id is None:
            return {"path": str(self.path.resolve())}
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


def split_hub_id(spec: str) -> tuple[str, str | None] | None:
    """'org/name@rev' → ('org/name', 'rev'); None when it is not shaped like a Hub id."""
    if not _HUB_ID.match(spec):
        return None
    repo, _, rev = spec.partition("@")
    return repo, rev or None


# File names that are never Hub repo ids, even when shaped like org/name.
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".safetensors", ".bin", ".yaml", ".yml")


def join_local(spec: str | Path, base: str | Path | None = None) -> Path:
    """`spec` as a local path: `~` expanded first, then a relative path joined to `base` (the
    folder of the manifest or config that holds it; default: the working directory)."""
    path = Path(spec).expanduser()
    return path if path.is_absolute() else Path(base or ".").expanduser() / path


def local_path(spec: str, base: str | Path | None = None) -> Path | None:
    """The local path `spec` names, or None when it names a Hub repo (`org/name[@revision]`).

    The one rule for every input of the tool and the trainers (paths as `join_local` makes
    them). A spec is local when it is absolute or explicitly relative (`./`, `../`, `~`), when
    that path exists, when it names a file (`FILE_SUFFIXES`), or when it is not shaped like a
    Hub id; otherwise it is a Hub id.
    """
    path = join_local(spec, base)
    explicit = spec.startswith(("/", "./", "../", "~")) or spec in (".", "..")
    if (explicit or path.exists() or Path(spec).suffix in FILE_SUFFIXES
            or split_hub_id(spec) is None):
        return path
    return None


def local_inputs(*specs: str) -> list[Path]:
    """The inputs among `specs` that are existing local paths (to keep outputs away from them)."""
    paths = (local_path(s) for s in specs)
    return [p for p in paths if p is not None and p.exists()]


def resolve(spec: str, base: str | Path | None = None) -> Source:
    """A local path (see `local_path`), else a Hub repo id downloaded (only the needed files).

    A Hub id that cannot be had is one HubError that also names the local folder looked for,
    since `runs/sft` before the run exists is shaped like a Hub id too."""
    local = local_path(spec, base)
    if local is not None:
        return Source(spec, local)
    repo_id, revision = split_hub_id(spec)  # type: ignore[misc]
    return _download(spec, repo_id, revision, join_local(spec, base).resolve())


def check_input(spec: str, base: str | Path | None = None) -> None:
    """Fail early and in one line when `spec` is neither an existing local path nor a Hub repo
    that can be reached (or is cached, offline). Downloads nothing."""
    local = local_path(spec, base)
    if local is not None:
        if not local.exists():
            where = "" if str(local) == spec else f" ({local})"
            raise HubError(f"{spec}: no such file or folder{where}; give a local folder or a "
                           "Hub id like org/name[@revision]")
        return
    repo_id, revision = split_hub_id(spec)  # type: ignore[misc]
    _hub_call(spec, repo_id, revision, join_local(spec, base).resolve(),
              lambda: _repo_exists(repo_id, revision))


def _repo_exists(repo_id: str, revision: str | None) -> None:
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub import errors as hf_errors

    if constants.HF_HUB_OFFLINE:
        if not isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
            raise hf_errors.LocalEntryNotFoundError(f"{repo_id} is not in the cache")
        return
    HfApi().model_info(repo_id, revision=revision)


def _httpx_modules() -> list:
    """httpx as huggingface_hub 2.x vendors it (`httpx2`), and plain httpx where installed."""
    modules = []
    for name in ("httpx2", "httpx"):
        try:
            modules.append(__import__(name))
        except ImportError:
            continue
    return modules


def network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the Hub could not be reached: huggingface_hub 2.x raises httpx's
    transport errors (not OSErrors) for refused connections, DNS failures and timeouts."""
    return (ConnectionError, TimeoutError, *(m.TransportError for m in _httpx_modules()))


def transient_errors() -> tuple[type[BaseException], ...]:
    """The network errors worth retrying: timeouts, dropped or refused connections."""
    return (ConnectionError, TimeoutError,
            *(t for m in _httpx_modules()
              for t in (m.TimeoutException, m.NetworkError, m.RemoteProtocolError)))


def resolve_headers(spec: str, base: str | Path | None = None) -> Source:
    """Like `resolve`, but a Hub repo is fetched without its weights: the config, tokenizer,
    index, adapter config and provenance are downloaded, the safetensors headers are read by
    range requests when the checkpoint is opened (`remote_weights`). Legacy `.bin` weights
    have no header: those are downloaded."""
    local = local_path(spec, base)
    if local is not None:
        return Source(spec, local)
    repo_id, revision = split_hub_id(spec)  # type: ignore[misc]
    from huggingface_hub import HfApi, constants, snapshot_download

    def fetch():
        info = HfApi().model_info(repo_id, revision=revision)
        names = [x.rfilename for x in info.siblings or []]
        small = list(SIDE_FILES) + EXTRA_FILES + ["*.safetensors.index.json"]
        folder = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=small))
        return info.sha, names, folder

    looked = join_local(spec, base).resolve()
    if constants.HF_HUB_OFFLINE:  # no range requests offline: the cache has the files or not
        return _download(spec, repo_id, revision, looked)
    commit, names, folder = _hub_call(spec, repo_id, revision, looked, fetch)
    weights = tuple(n for n in weight_files(names, lambda n: _read_json(folder / n, repo_id))
                    if n.endswith(".safetensors"))
    if not weights:
        log.warning("%s: no safetensors weights; downloading the legacy weights to read them",
                    repo_id)
        return _download(spec, repo_id, revision, looked)
    return Source(spec, folder, repo_id, revision, commit, weight_files=weights)


def read_range(source: Source, filename: str, start: int, nbytes: int) -> bytes:
    """Bytes [start, start + nbytes) of a file of a Hub source, by one HTTP range request."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(source.repo_id, filename, revision=source.commit,
                     endpoint=constants.ENDPOINT)

    def get():
        r = get_session().get(url, headers={**build_hf_headers(),
                                            "Range": f"bytes={start}-{start + nbytes - 1}"},
                              follow_redirects=True)
        hf_raise_for_status(r)
        return r.content

    data = _hub_call(source.spec, source.repo_id, source.commit, None, get)
    if len(data) != nbytes:
        raise HubError(f"{source.repo_id}: {filename}: asked for {nbytes} bytes at {start}, got "
                       f"{len(data)} (the server ignored the range request?)")
    return data


def remote_header(source: Source, filename: str) -> bytes:
    """The raw safetensors header of a Hub file: its 8-byte length, then the JSON."""
    import struct

    (n,) = struct.unpack("<Q", read_range(source, filename, 0, 8))
    if n > 100 * 2**20:
        raise HubError(f"{source.repo_id}: {filename}: a header of {n} bytes is not a "
                       "safetensors header; the file is corrupt")
    return read_range(source, filename, 8, n)


def remote_weights(source: Source):
    """A header-only `Checkpoint` of a Hub source (data, when read, by range requests)."""
    from .checkpoint import Checkpoint

    raws = {name: remote_header(source, name) for name in source.weight_files or ()}
    return Checkpoint.from_headers(
        source.path, raws, lambda file, start, n: read_range(source, file.name, start, n))


def _hub_call(spec: str, repo_id: str, revision: str | None, looked: Path | None, fn):
    """Run a Hub request for `spec`; its failures become one HubError naming what was looked
    for locally (`looked`, None when nothing was) and why the Hub could not give it."""
    from huggingface_hub import errors as hf_errors

    not_local = f"{spec}: no local folder {looked}, and" if looked is not None else f"{spec}:"
    try:
        return fn()
    except hf_errors.GatedRepoError:
        raise HubError(f"{repo_id}: gated repository; accept its terms on the Hub and log "
                       "in") from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"{not_local} no Hub repository {repo_id} (repository not found; if it "
                       "is private, log in with `hf auth login` or set HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{repo_id}: revision {revision!r} not found; check the branch, tag "
                       "or commit") from None
    except hf_errors.LocalEntryNotFoundError as e:
        cause = "HF_HUB_OFFLINE is set and it is not in the Hub cache" if _offline() else \
            f"the Hub could not be reached ({_first_line(e)})"
        raise HubError(f"{not_local} {cause}; check the path, or download {repo_id} "
                       "first") from None
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"{repo_id}: Hub request failed ({e.__class__.__name__}: "
                       f"{_first_line(e)})") from None
    except network_errors() as e:
        raise HubError(f"{not_local} the Hub could not be reached ({type(e).__name__}: "
                       f"{_first_line(e)}); check the path, or the network and "
                       "HF_ENDPOINT") from None


def _read_json(path: Path, repo_id: str) -> dict:
    import json

    try:
        return json.loads(Path(path).read_text())
    except ValueError:
        raise HubError(f"{repo_id}: {Path(path).name} is not valid JSON; the repository's index "
                       "is broken") from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def weight_files(names: list[str], read_index) -> list[str]:
    """The weight files to fetch from a repo listing `names` (top level only): the index and
    the shards it names, else model.safetensors, else every top-level *.safetensors; legacy
    .bin patterns when there is no safetensors. `read_index(name)` returns an index's JSON."""
    top = [n for n in names if "/" not in n]
    indexes = [n for n in top if n.endswith(".safetensors.index.json")]
    index = INDEX_NAME if INDEX_NAME in top else indexes[0] if len(indexes) == 1 else None
    if index is not None:
        weight_map = read_index(index).get("weight_map") or {}
        return [index, *sorted(set(weight_map.values()))]
    if SINGLE_NAME in top:
        return [SINGLE_NAME]
    safetensors = [n for n in top if n.endswith(".safetensors")]
    return safetensors or LEGACY_PATTERNS


def _download(spec: str, repo_id: str, revision: str | None, looked: Path) -> Source:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    def fetch() -> Source:
        extra = list(SIDE_FILES) + EXTRA_FILES
        if _offline():
            folder = snapshot_download(repo_id, revision=revision,
                                       allow_patterns=WEIGHT_PATTERNS + extra)
            return Source(spec, Path(folder), repo_id, revision, Path(folder).name)
        info = HfApi().model_info(repo_id, revision=revision)

        def read_index(name: str) -> dict:
            return _read_json(hf_hub_download(repo_id, name, revision=info.sha), repo_id)

        weights = weight_files([s.rfilename for s in info.siblings or []], read_index)
        log.info("downloading %s@%s (%d weight files)", repo_id, info.sha, len(weights))
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=weights + extra)
        return Source(spec, Path(folder), repo_id, revision, info.sha)

    return _hub_call(spec, repo_id, revision, looked, fetch)


def lfs_sha256(file: Path) -> str | None:
    """The sha256 of a Hub-cached LFS file is the name of the blob it links to."""
    blob = Path(os.path.realpath(file)).name
    return blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None


# ---- publishing -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PushResult:
    repo_url: str
    commit_url: str
    pr_url: str | None
    commits: int
    skipped: tuple[str, ...]  # files already on the Hub with the same content (resumed upload)


RETRY_STATUSES = (429, 500, 502, 503, 504)
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)
SMALL_FILE = 10 * 2**20


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _with_retries(what: str, repo_id: str, fn, delays=None):
    """Run fn, retrying transient failures (5xx, 429, connection errors) with backoff; turn the
    rest into one-line HubErrors naming the repo. Tokens never appear in messages."""
    import time

    from huggingface_hub import errors as hf_errors

    delays = RETRY_DELAYS if delays is None else delays
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except hf_errors.OfflineModeIsEnabled:
            raise HubError(f"{repo_id}: HF_HUB_OFFLINE is set; unset it to {what}") from None
        except hf_errors.RepositoryNotFoundError:
            raise HubError(f"{repo_id}: repository not found, or no access with this token "
                           "(set HF_TOKEN or run `hf auth login`)") from None
        except hf_errors.RevisionNotFoundError:
            raise HubError(f"{repo_id}: revision not found; create the branch first") from None
        except (hf_errors.HfHubHTTPError, hf_errors.HFValidationError, OSError,
                *network_errors()) as e:  # HTTP and network errors: sort them by status
            status = _status(e)
            if status in (401, 403):
                raise HubError(f"{repo_id}: {what} refused ({status}): check that HF_TOKEN or "
                               "your `hf auth login` token has write access") from None
            if status == 404:
                raise HubError(f"{repo_id}: not found (404) while trying to {what}") from None
            transient = status in RETRY_STATUSES or (
                status is None and isinstance(e, transient_errors()))
            if not transient or attempt == len(delays):
                raise HubError(f"{repo_id}: could not {what} ({type(e).__name__}: "
                               f"{_first_line(e)})") from None
            log.warning("%s: %s failed (%s); retrying in %.0fs", repo_id, what,
                        status or type(e).__name__, delays[attempt])
            time.sleep(delays[attempt])


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, repo_type: str = "model",
         max_commit_bytes: int = 50 * 10**9, ignore: tuple[str, ...] = (),
         readme: str | None = None) -> PushResult:
    """Upload a folder to the Hub: create the repo if needed, then one commit — or, for folders
    larger than `max_commit_bytes`, several commits that skip files already uploaded (so a
    failed push can be rerun and resumes), with the small files (card, config) last. Files
    matching an `ignore` glob (relative posix paths) and hidden files stay local. `readme`:
    the card text to upload instead of the folder's README.md (the folder is not changed)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder}: not a folder; push needs the output folder of a merge, "
                       "extract or training run")
    if split_hub_id(repo_id) is None or "@" in repo_id:
        raise HubError(f"{repo_id!r}: expected a repo id like org/name (use --revision for a "
                       "branch)")
    if readme is not None:
        with _staged(folder, readme) as staged:
            return push(staged, repo_id, private=private, revision=revision,
                        create_pr=create_pr, commit_message=commit_message, repo_type=repo_type,
                        max_commit_bytes=max_commit_bytes, ignore=ignore)
    api = HfApi()
    message = commit_message or f"Upload {folder.name} with mergekit-rl"
    repo = _with_retries("create the repository", repo_id, lambda: api.create_repo(
        repo_id, private=private, repo_type=repo_type, exist_ok=True))
    if revision and not create_pr:
        _with_retries("create the branch", repo_id, lambda: api.create_branch(
            repo_id, branch=revision, repo_type=repo_type, exist_ok=True))
    def skipped_file(rel: Path) -> bool:
        return (any(part.startswith(".") for part in rel.parts)
                or any(fnmatch.fnmatch(rel.as_posix(), pattern) for pattern in ignore))

    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not skipped_file(p.relative_to(folder)))
    total = sum(p.stat().st_size for p in files)

    def upload(allow=None, msg=message):
        return _with_retries("upload", repo_id, lambda: api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type=repo_type, revision=revision,
            create_pr=create_pr, commit_message=msg, allow_patterns=allow,
            ignore_patterns=list(ignore) or None))

    if total <= max_commit_bytes or create_pr:
        info = upload()
        return PushResult(str(repo), info.commit_url, info.pr_url, 1, ())
    # Large folder: batches of big files, skipping what the Hub already holds.
    big = [p for p in files if p.stat().st_size > SMALL_FILE]
    small = [p for p in files if p.stat().st_size <= SMALL_FILE]
    remote = _remote_sha256(api, repo_id, repo_type, revision, [p.relative_to(folder) for p in big])
    from .checkpoint import file_sha256

    todo, skipped = [], []
    for p in big:
        rel = p.relative_to(folder).as_posix()
        (skipped if remote.get(rel) == file_sha256(p) else todo).append(p)
    batches, batch, size = [], [], 0
    for p in todo:
        if batch and size + p.stat().st_size > max_commit_bytes:
            batches.append(batch)
            batch, size = [], 0
        batch.append(p)
        size += p.stat().st_size
    batches += [batch] if batch else []
    commits = 0
    for k, b in enumerate(batches):
        upload([p.relative_to(folder).as_posix() for p in b],
               f"{message} (part {k + 1}/{len(batches) + 1})")
        commits += 1
    info = upload([p.relative_to(folder).as_posix() for p in small] or None, message)
    return PushResult(str(repo), info.commit_url, info.pr_url, commits + 1,
                      tuple(p.relative_to(folder).as_posix() for p in skipped))


@contextlib.contextmanager
def _staged(folder: Path, readme: str):
    """FOLDER as symbolic links to its files, under the same name, with another README.md."""
    with tempfile.TemporaryDirectory(prefix="mkrl-push-") as tmp:
        staged = Path(tmp) / folder.resolve().name
        staged.mkdir()
        for p in folder.rglob("*"):
            rel = p.relative_to(folder)
            if p.is_file() and rel.as_posix() != "README.md":
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                (staged / rel).symlink_to(p.resolve())
        (staged / "README.md").write_text(readme)
        yield staged


def _remote_sha256(api, repo_id: str, repo_type: str, revision: str | None,
                   paths: list[Path]) -> dict[str, str]:
    """sha256 of the LFS files already on the Hub; {} when they cannot be listed (no resume)."""
    if not paths:
        return {}
    try:
        infos = _with_retries("list remote files", repo_id, lambda: api.get_paths_info(
            repo_id, [p.as_posix() for p in paths], repo_type=repo_type, revision=revision,
            expand=False))
    except HubError as e:
        log.info("cannot list remote files, uploading everything: %s", e)
        return {}
    return {i.path: i.lfs.sha256 for i in infos if getattr(i, "lfs", None)}
