"""The one module that talks to the network: the Hugging Face Hub, through huggingface_hub.

Inputs given as `org/name[@revision]` are resolved to a local snapshot holding only what we need:
the safetensors weights (or legacy `.bin` when a repo has nothing else), the index, config,
tokenizer and chat template. The endpoint comes from `HF_ENDPOINT`, the token from `HF_TOKEN` or
the huggingface_hub login, offline mode from `HF_HUB_OFFLINE`, as everywhere in the ecosystem.
"""

from __future__ import annotations

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


def resolve(spec: str) -> Source:
    """A local path when it exists, else a Hub repo id downloaded (only the needed files)."""
    local = Path(spec).expanduser()
    if local.exists() or spec.startswith((".", "/", "~")) or split_hub_id(spec) is None:
        return Source(spec, local)
    repo_id, revision = split_hub_id(spec)  # type: ignore[misc]
    return _download(spec, repo_id, revision)


def lfs_sha256(file: Path) -> str | None:
    """The sha256 of a Hub-cached LFS file is the name of the blob it links to."""
    blob = Path(os.path.realpath(file)).name
    return blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None


def _download(spec: str, repo_id: str, revision: str | None) -> Source:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf_errors

    try:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            folder = snapshot_download(repo_id, revision=revision,
                                       allow_patterns=WEIGHT_PATTERNS + list(SIDE_FILES))
            return Source(spec, Path(folder), repo_id, revision, Path(folder).name)
        info = HfApi().model_info(repo_id, revision=revision)
        names = [s.rfilename for s in info.siblings or []]
        has_st = any(n.endswith(".safetensors") for n in names)
        patterns = (WEIGHT_PATTERNS if has_st else LEGACY_PATTERNS) + list(SIDE_FILES)
        log.info("downloading %s@%s (%s)", repo_id, info.sha, "safetensors" if has_st else "bin")
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns)
        return Source(spec, Path(folder), repo_id, revision, info.sha)
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
