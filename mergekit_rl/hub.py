"""The one module that talks to the network: the Hugging Face Hub, through huggingface_hub.

Inputs given as `org/name[@revision]` are resolved to a local snapshot holding only what we need:
the safetensors weights (or legacy `.bin` when a repo has nothing else), the index, config,
tokenizer and chat template. The endpoint comes from `HF_ENDPOINT`, the token from `HF_TOKEN` or
the huggingface_hub login, offline mode from `HF_HUB_OFFLINE`, as everywhere in the ecosystem.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import SIDE_FILES
from .errors import HubError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
LEGACY_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


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


def local_path(spec: str, base: str | Path | None = None) -> Path | None:
    """The local path `spec` names, or None when it names a Hub repo (`org/name[@revision]`).

    The one rule for every input of the tool and the trainers: `~` is expanded first; a
    relative path is joined to `base` (the folder of the manifest or config that holds it;
    default: the working directory). A spec is local when it is absolute or explicitly relative
    (`./`, `../`, `~`), when that path exists, when it names a file (`FILE_SUFFIXES`), or when
    it is not shaped like a Hub id; otherwise it is a Hub id.
    """
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = Path(base or ".").expanduser() / path
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
    """A local path (see `local_path`), else a Hub repo id downloaded (only the needed files)."""
    local = local_path(spec, base)
    if local is not None:
        return Source(spec, local)
    repo_id, revision = split_hub_id(spec)  # type: ignore[misc]
    return _download(spec, repo_id, revision)


def resolve_headers(spec: str, base: str | Path | None = None) -> Source:
    """Like `resolve`, but a Hub repo is fetched without its weights: the config, tokenizer,
    index, adapter config and provenance are downloaded, the safetensors headers are read by
    range requests when the checkpoint is opened (`remote_weights`). Legacy `.bin` weights
    have no header: those are downloaded."""
    local = local_path(spec, base)
    if local is not None:
        return Source(spec, local)
    repo_id, revision = split_hub_id(spec)  # type: ignore[misc]
    from huggingface_hub import HfApi, snapshot_download

    def fetch():
        info = HfApi().model_info(repo_id, revision=revision)
        names = [x.rfilename for x in info.siblings or []]
        small = list(SIDE_FILES) + ["*.safetensors.index.json", "README.md",
                                    "adapter_config.json", "provenance.json"]
        folder = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=small))
        return info.sha, names, folder

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # no range requests offline: the cache has the files or not
        return _download(spec, repo_id, revision)
    commit, names, folder = _hub_call(repo_id, revision, fetch)
    weights = _weight_files(folder, names)
    if weights is None:
        log.warning("%s: no safetensors weights; downloading the legacy weights to read them",
                    repo_id)
        return _download(spec, repo_id, revision)
    return Source(spec, folder, repo_id, revision, commit, weight_files=weights)


def _weight_files(folder: Path, names: list[str]) -> tuple[str, ...] | None:
    """The safetensors files a checkpoint reads: the index's shards, else the single file(s)."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return tuple(sorted(set(json.loads(index.read_text())["weight_map"].values())))
        except (ValueError, KeyError, TypeError):
            return None
    if "adapter_model.safetensors" in names:  # with our low-rank vectors' dense deltas
        return tuple(n for n in ("adapter_model.safetensors", "mergekit_rl_dense.safetensors")
                     if n in names)
    if "model.safetensors" in names:
        return ("model.safetensors",)
    found = tuple(sorted(n for n in names if n.endswith(".safetensors") and "/" not in n))
    return found or None


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

    data = _hub_call(source.repo_id, source.commit, get)
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


def _hub_call(repo_id: str, revision: str | None, fn):
    """Run fn, turning the Hub client's errors into one-line HubErrors (as `_download`)."""
    from huggingface_hub import errors as hf_errors

    try:
        return fn()
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"{repo_id}: repository not found on the Hub (or private: log in with "
                       "`hf auth login` or set HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{repo_id}: revision {revision!r} not found; check the branch, tag "
                       "or commit") from None
    except hf_errors.GatedRepoError:
        raise HubError(f"{repo_id}: gated repository; accept its terms on the Hub and log "
                       "in") from None
    except hf_errors.LocalEntryNotFoundError:
        raise HubError(f"{repo_id}: not in the local cache and HF_HUB_OFFLINE is set (or the "
                       "Hub is unreachable); unset HF_HUB_OFFLINE or download it first") from None
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"{repo_id}: Hub request failed ({e.__class__.__name__}: "
                       f"{str(e).splitlines()[0]})") from None


def lfs_sha256(file: Path) -> str | None:
    """The sha256 of a Hub-cached LFS file is the name of the blob it links to."""
    blob = Path(os.path.realpath(file)).name
    return blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None


def _download(spec: str, repo_id: str, revision: str | None) -> Source:
    from huggingface_hub import HfApi, constants, snapshot_download

    def fetch() -> Source:
        if constants.HF_HUB_OFFLINE:
            folder = snapshot_download(repo_id, revision=revision,
                                       allow_patterns=WEIGHT_PATTERNS + list(SIDE_FILES)
                                       + ["README.md"])
            return Source(spec, Path(folder), repo_id, revision, Path(folder).name)
        info = HfApi().model_info(repo_id, revision=revision)
        names = [s.rfilename for s in info.siblings or []]
        has_st = any(n.endswith(".safetensors") for n in names)
        # README.md only for its front matter (license); it is never copied into outputs
        patterns = (WEIGHT_PATTERNS if has_st else LEGACY_PATTERNS) + list(SIDE_FILES) + [
            "README.md", "adapter_config.json", "provenance.json"]
        log.info("downloading %s@%s (%s)", repo_id, info.sha, "safetensors" if has_st else "bin")
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns)
        return Source(spec, Path(folder), repo_id, revision, info.sha)

    return _hub_call(repo_id, revision, fetch)


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
        except Exception as e:  # network errors come as several types; sort them by status
            status = _status(e)
            if status in (401, 403):
                raise HubError(f"{repo_id}: {what} refused ({status}): check that HF_TOKEN or "
                               "your `hf auth login` token has write access") from None
            if status == 404:
                raise HubError(f"{repo_id}: not found (404) while trying to {what}") from None
            transient = status in RETRY_STATUSES or (
                status is None and isinstance(e, (ConnectionError, TimeoutError, OSError))
                and not isinstance(e, HubError))
            if not transient or attempt == len(delays):
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise HubError(f"{repo_id}: could not {what} ({first})") from None
            log.warning("%s: %s failed (%s); retrying in %.0fs", repo_id, what,
                        status or type(e).__name__, delays[attempt])
            time.sleep(delays[attempt])


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, repo_type: str = "model",
         max_commit_bytes: int = 50 * 10**9, ignore: tuple[str, ...] = ()) -> PushResult:
    """Upload a folder to the Hub: create the repo if needed, then one commit — or, for folders
    larger than `max_commit_bytes`, several commits that skip files already uploaded (so a
    failed push can be rerun and resumes), with the small files (card, config) last. Files
    matching an `ignore` glob (relative posix paths) and hidden files stay local."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder}: not a folder; push needs the output folder of a merge, "
                       "extract or training run")
    if split_hub_id(repo_id) is None or "@" in repo_id:
        raise HubError(f"{repo_id!r}: expected a repo id like org/name (use --revision for a "
                       "branch)")
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
