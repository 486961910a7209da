"""A local, in-memory fake of the Hugging Face Hub HTTP API (stdlib only; PyYAML used if present).

Serves the subset of the API huggingface_hub 2.x (checked against 2.4.0) uses to create repos,
upload (regular files inline, LFS files through the LFS batch API), read repo info / trees and
download files, so the real client can be tested hermetically on 127.0.0.1.

Pointing the client at it: huggingface_hub copies HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE,
HF_HUB_DISABLE_XET... into `huggingface_hub.constants` *at import time*, and
`huggingface_hub.upload_folder` & co are bound methods of a module-level `HfApi()` whose `endpoint`
was frozen then too. In pytest the package is already imported (conftest -> transformers), so
setting env vars is too late: call `configure_hf_client(monkeypatch, hub.endpoint, home=tmp_path)`,
which patches those constants and `huggingface_hub.hf_api.api.endpoint` and sets the env vars.
A subprocess started with HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_DISABLE_XET=1 needs nothing else.

Xet must be off: with hf_xet installed, uploads otherwise go to Xet storage and `upload_folder`
takes a pipelined multi-commit path, neither of which this server implements.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

try:
    import yaml
except ImportError:  # pragma: no cover - huggingface_hub itself depends on PyYAML
    yaml = None

USER = "test-user"  # owner of every token-authenticated request
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs -text\n"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def front_matter(text: str) -> dict | None:
    """The YAML front matter of a README (None if absent); ValueError if it is not a mapping."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not m or yaml is None:
        return None if not m else {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        raise ValueError(f"Invalid YAML in README.md front matter: {e}") from e
    if not isinstance(data, (dict, type(None))):
        raise ValueError("README.md front matter must be a YAML mapping")  # noqa: TRY004
    return data or {}


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        spec = "version https://git-lfs.github.com/spec/v1"
        return f"{spec}\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @cached_property
    def git_oid(self) -> str:  # what git stores: the pointer file for LFS blobs
        return git_blob_oid(self.pointer if self.lfs else self.data)

    def lfs_info(self, sha_key: str) -> dict:
        return {sha_key: self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, Blob]  # full snapshot of the tree at this commit


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1"... -> commit oid
    num_prs: int = 0
    created_at: str = field(default_factory=_now)

    def add_commit(self, branch: str, files: dict, title: str, message: str = "") -> Commit:
        parent = self.branches.get(branch)
        oid = hashlib.sha1(f"{self.repo_id}:{parent}:{title}:{uuid.uuid4()}".encode()).hexdigest()
        self.commits[oid] = Commit(oid, parent, title, message, _now(), files)
        self.branches[branch] = oid
        return self.commits[oid]

    def resolve(self, rev: str) -> Commit | None:
        """A branch name (also `refs/heads/x`, `refs/pr/N`) or a full commit oid."""
        rev = rev.removeprefix("refs/heads/")
        return self.commits.get(self.branches.get(rev, rev))

    @property
    def files(self) -> dict[str, bytes]:
        """Files at the head of main: path -> bytes."""
        return {p: b.data for p, b in self.resolve("main").files.items()}

    def url(self, endpoint: str) -> str:
        return f"{endpoint}/{PREFIX[self.repo_type]}{self.repo_id}"


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, *,
                 body: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.body, self.headers = body, headers or {}


class FakeHub:
    """In-memory Hub serving the subset of the HTTP API huggingface_hub 2.x uses to create repos,
    upload (regular + LFS), read model info / trees, and download files.

    `repos`: `"model/org/name"` -> `Repo`; `requests`: `(method, raw path with query, headers with
    lower-case names)`; `fail_plan`: `{(method, path_regex): status | (status, times[, code])}`,
    i.e. `fail_next` calls made up front. With `token=None` every request counts as authenticated.
    `served`: bytes sent per file path by GET /resolve (honouring `Range: bytes=a-b`, `a-`, `-n`).
    """

    LFS_SUFFIXES = (".safetensors", ".bin")
    LFS_THRESHOLD = 10 * 1024 * 1024

    def __init__(self, token: str | None = "hf_test_token", fail_plan: dict | None = None):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded through the PUT
        self.requests: list[tuple[str, str, dict]] = []
        self.served: dict[str, int] = {}  # "org/name/file" -> bytes of it sent by GET resolve
        self.endpoint: str | None = None
        self._announced: dict[str, int] = {}  # sha256 -> size announced to the batch endpoint
        self._failures: list[list] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        for (method, regex), spec in (fail_plan or {}).items():
            self.fail_next(method, regex, *(spec if isinstance(spec, tuple) else (spec,)))

    def start(self) -> str:
        """Serve on 127.0.0.1:<free port> from a daemon thread; returns the endpoint URL."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self.endpoint

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections, so that a client's pooled
        connection can never reach this hub again (e.g. a later FakeHub on the same port)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail_next(self, method: str, path_regex: str, status: int, times: int = 1,
                  code: str | None = None) -> None:
        """Answer the next `times` requests whose method matches (`"*"`: any) and whose path
        (query excluded) matches `re.search(path_regex)` with `status` (+ `X-Error-Code: code`)."""
        with self._lock:
            self._failures.append([method.upper(), re.compile(path_regex), status, times, code])

    def count(self, method: str, path_regex: str) -> int:
        """Number of logged requests with this method whose raw path (with query) matches."""
        rx = re.compile(path_regex)
        return sum(1 for m, p, _ in self.requests if m == method.upper() and rx.search(p))

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo directly (initial commit with `.gitattributes`, like the real Hub)."""
        with self._lock:
            repo = Repo(repo_type, repo_id, private=private)
            repo.add_commit("main", {".gitattributes": Blob(GITATTRIBUTES, False)}, "initial commit")
            self.repos[f"{repo_type}/{repo_id}"] = repo
            return repo

    def upload_mode(self, path: str, size: int) -> str:
        return "lfs" if path.endswith(self.LFS_SUFFIXES) or size > self.LFS_THRESHOLD else "regular"

    def _take_failure(self, method: str, path: str) -> tuple | None:
        with self._lock:
            for f in self._failures:
                if f[3] > 0 and f[0] in ("*", method) and f[1].search(path):
                    f[3] -= 1
                    return f[2], f[4]
        return None


_API = r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)"
_GIT = r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)"  # models have no prefix outside /api
_ROUTES = [
    ("GET", r"^/api/whoami-v2$", "whoami"),
    ("POST", r"^/api/repos/create$", "create"),
    ("POST", r"^/api/validate-yaml$", "validate_yaml"),
    ("GET", _API + r"(?:/revision/([^/]+))?$", "info"),
    ("GET", _API + r"/tree/([^/]+)(?:/(.+))?$", "tree"),
    ("POST", _API + r"/preupload/([^/]+)$", "preupload"),
    ("POST", _API + r"/commit/([^/]+)$", "commit"),
    ("POST", _API + r"/branch/([^/]+)$", "branch"),
    ("POST", _API + r"/paths-info/([^/]+)$", "paths_info"),
    ("GET", _GIT + r"/resolve/([^/]+)/(.+)$", "resolve"),
    ("HEAD", _GIT + r"/resolve/([^/]+)/(.+)$", "resolve"),
    ("POST", _GIT.removesuffix("([^/]+)") + r"([^/]+)\.git/info/lfs/objects/(batch|verify)$", "lfs"),
    ("PUT", r"^/lfs-upload/([0-9a-f]{64})$", "lfs_put"),  # the "S3" URL: no Hub token sent
]
_WRITES = {"create", "preupload", "commit", "branch", "lfs"}
_TRUE = ("1", "true")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx pools connections
    timeout = 60  # idle pooled connections end eventually

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        self.server.hub._connections.discard(self.connection)
        super().finish()

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body, headers: dict) -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        self.send_response(status)
        headers |= {"X-Request-Id": str(uuid.uuid4()), "Content-Length": len(body)}
        for key, value in headers.items():  # a header value must be one latin-1 line
            self.send_header(key, " ".join(str(value).split()).encode("latin-1", "replace")
                             .decode("latin-1"))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self) -> None:
        body = self._read_body()  # always read it all: the connection is reused
        url = urlsplit(self.path)
        self.query = {k: v[-1].lower() for k, v in parse_qs(url.query).items()}
        self.hub.requests.append((self.command, self.path,
                                  {k.lower(): v for k, v in self.headers.items()}))
        try:
            if failure := self.hub._take_failure(self.command, url.path):
                raise HubError(failure[0], f"Injected failure ({failure[0]})", failure[1])
            for method, pattern, name in _ROUTES:
                if method == self.command and (m := re.match(pattern, url.path)):
                    self.auth = self._auth(name)
                    args = [unquote(g) if g is not None else None for g in m.groups()]
                    status, payload, headers = getattr(self, "h_" + name)(body, *args)
                    return self._send(status, payload, headers)
            raise HubError(404, f"Not found: {self.command} {url.path}")
        except HubError as e:
            headers = {**e.headers, "X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, e.body or {"error": e.message}, headers)

    def _auth(self, route: str) -> bool:
        """True if authenticated; 401 on a wrong token, or on a write without a token."""
        if self.hub.token is None or route == "lfs_put":
            return True
        header = self.headers.get("Authorization")
        if header is None and route in _WRITES:
            raise HubError(401, "You must be authenticated to access this resource")
        if header is not None and header != f"Bearer {self.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return header is not None

    def _repo(self, kind: str | None, ns: str, name: str) -> Repo:
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(kind, "model")
        repo = self.hub.repos.get(f"{repo_type}/{ns}/{name}")
        if repo is None or (repo.private and not self.auth):  # private looks missing, as on the Hub
            raise HubError(404 if self.auth else 401, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _commit(repo: Repo, rev: str) -> Commit:
        if (commit := repo.resolve(rev)) is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    @staticmethod
    def _json(body: bytes) -> dict:
        try:
            return json.loads(body or b"{}")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    # -- endpoints: each returns (status, JSON-able payload or bytes, headers) --------------------
    def h_whoami(self, body):
        if not self.auth:
            raise HubError(401, "Invalid username or password.")
        token = {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}}
        return 200, {"type": "user", "name": USER, "fullname": "Test User", "orgs": [],
                     "auth": token}, {}

    def h_create(self, body):
        data = self._json(body)
        name, repo_type = data.get("name", ""), data.get("type") or "model"
        repo_id = name if "/" in name else f"{data.get('organization') or USER}/{name}"
        with self.hub._lock:
            if (repo := self.hub.repos.get(f"{repo_type}/{repo_id}")) is not None:
                msg = "You already created this repo"  # exist_ok=True reads the url
                raise HubError(409, msg, body={"error": msg, "url": repo.url(self.hub.endpoint)})
            private = data.get("visibility") == "private" or bool(data.get("private"))
            repo = self.hub.create_repo(repo_id, repo_type, private=private)
        return 200, {"url": repo.url(self.hub.endpoint), "name": repo_id, "id": repo_id}, {}

    def h_validate_yaml(self, body):
        try:
            front_matter(self._json(body).get("content", ""))
        except ValueError as e:
            raise HubError(400, str(e), body={"errors": [{"message": str(e)}], "warnings": []}) from e
        return 200, {"errors": [], "warnings": []}, {}

    def h_info(self, body, kind, ns, name, rev):
        repo = self._repo(kind, ns, name)
        commit = self._commit(repo, rev or "main")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            siblings.append({"rfilename": path})
            if self.query.get("blobs") in _TRUE:  # files_metadata=True
                siblings[-1].update(size=len(blob.data), blobId=blob.git_oid,
                                    lfs=blob.lfs_info("sha256") if blob.lfs else None)
        info = {"_id": repo.repo_id, "id": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": commit.oid, "private": repo.private, "gated": False, "disabled": False,
                "lastModified": commit.date, "createdAt": repo.created_at, "downloads": 0,
                "likes": 0, "tags": [], "siblings": siblings}
        if readme := commit.files.get("README.md"):
            try:
                card = front_matter(readme.data.decode("utf-8", "replace"))
            except ValueError:
                card = None
            if card is not None:
                info |= {"cardData": card, "tags": list(card.get("tags") or [])}
        return 200, info, {}

    def h_tree(self, body, kind, ns, name, rev, path):
        commit = self._commit(self._repo(kind, ns, name), rev)
        base = (path or "").strip("/")
        base += "/" if base else ""
        recursive, expand = self.query.get("recursive") in _TRUE, self.query.get("expand") in _TRUE
        entries, dirs = [], set()
        for p, blob in sorted(commit.files.items()):
            if not p.startswith(base):
                continue
            parts = p[len(base):].split("/")
            dirs.update(base + "/".join(parts[:i])
                        for i in range(1, len(parts) if recursive else min(len(parts), 2)))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "oid": blob.git_oid, "size": len(blob.data),
                                "path": p})
                if blob.lfs:
                    entries[-1]["lfs"] = blob.lfs_info("oid")
                if expand:
                    entries[-1]["lastCommit"] = {"id": commit.oid, "title": commit.title,
                                                 "date": commit.date}
        if base and not entries and not dirs:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        entries += [{"type": "directory", "oid": git_blob_oid(d.encode()), "size": 0, "path": d}
                    for d in dirs]
        return 200, sorted(entries, key=lambda e: e["path"]), {}

    def h_paths_info(self, body, kind, ns, name, rev):
        """Form-encoded `paths` (repeated): the entries that exist, as the tree lists them."""
        commit = self._commit(self._repo(kind, ns, name), unquote(rev))
        wanted = parse_qs(body.decode()).get("paths", [])
        out = []
        for p in wanted:
            blob = commit.files.get(p)
            if blob is not None:
                out.append({"type": "file", "oid": blob.git_oid, "size": len(blob.data),
                            "path": p, **({"lfs": blob.lfs_info("oid")} if blob.lfs else {})})
        return 200, out, {}

    def h_branch(self, body, kind, ns, name, branch):
        repo = self._repo(kind, ns, name)
        start = self._commit(repo, self._json(body).get("startingPoint") or "main")
        with self.hub._lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            repo.branches[branch] = start.oid
        return 200, {}, {}

    def h_preupload(self, body, kind, ns, name, rev):
        repo = self._repo(kind, ns, name)
        commit = self._commit(repo, "main" if self.query.get("create_pr") in _TRUE else rev)
        files = []
        for f in self._json(body).get("files", []):
            remote = commit.files.get(f["path"])  # its oid lets the client skip unchanged files
            oid = None if remote is None else (remote.sha256 if remote.lfs else remote.git_oid)
            files.append({"path": f["path"], "uploadMode": self.hub.upload_mode(
                f["path"], int(f.get("size", 0))), "shouldIgnore": False, "oid": oid})
        return 200, {"files": files, "commitOid": commit.oid}, {}

    def h_commit(self, body, kind, ns, name, rev):
        repo = self._repo(kind, ns, name)
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Invalid ndjson: {e}") from e
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be the header")
        header = lines[0]["value"]
        with self.hub._lock:
            head = self._commit(repo, rev)
            if rev not in repo.branches:
                raise HubError(400, f"Cannot commit to {rev}: not a branch")
            if header.get("parentCommit") not in (None, head.oid):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for op in lines[1:]:
                self._apply(files, op.get("key"), op.get("value") or {})
            if self.query.get("create_pr") in _TRUE:
                repo.num_prs += 1
                rev = f"refs/pr/{repo.num_prs}"
                repo.branches[rev] = head.oid
            commit = repo.add_commit(rev, files, header.get("summary", ""),
                                     header.get("description", ""))
        url = repo.url(self.hub.endpoint)
        out = {"success": True, "commitOid": commit.oid, "commitUrl": f"{url}/commit/{commit.oid}"}
        if rev.startswith("refs/pr/"):
            out["pullRequestUrl"] = f"{url}/discussions/{rev.rsplit('/', 1)[1]}"
        return 200, out, {}

    def _apply(self, files: dict[str, Blob], key: str, value: dict) -> None:
        path = value.get("path", "")
        if key == "file":
            files[path] = Blob(base64.b64decode(value["content"]), False)
        elif key == "lfsFile":
            data = self.hub.lfs_objects.get(value.get("oid"))
            if data is None or value.get("size", len(data)) != len(data):
                raise HubError(422, f"LFS object {value.get('oid')} of {path} was never uploaded "
                                    "(or has another size)")
            files[path] = Blob(data, True)
        elif key in ("deletedFile", "deletedFolder"):
            gone = [p for p in files if p == path or p.startswith(path.rstrip("/") + "/")]
            if not gone or (key == "deletedFile" and gone != [path]):
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for p in gone:
                del files[p]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")

    def h_lfs(self, body, kind, ns, name, action):
        repo = self._repo(kind, ns, name)
        data = self._json(body)
        if action == "verify":
            stored = self.hub.lfs_objects.get(data.get("oid"))
            if stored is None or len(stored) != data.get("size"):
                raise HubError(404, f"LFS object {data.get('oid')} not found")
            return 200, {"success": True}, {}
        objects = []
        for obj in data.get("objects", []):
            objects.append({"oid": obj["oid"], "size": int(obj["size"]), "authenticated": True})
            if obj["oid"] not in self.hub.lfs_objects:  # already stored: no actions
                self.hub._announced[obj["oid"]] = int(obj["size"])
                objects[-1]["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/lfs-upload/{obj['oid']}",
                               "expires_in": 3600},
                    "verify": {"href": f"{repo.url(self.hub.endpoint)}.git/info/lfs/objects/verify",
                               "expires_in": 3600}}
        return 200, {"transfer": "basic", "objects": objects}, {
            "Content-Type": "application/vnd.git-lfs+json"}

    def h_lfs_put(self, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its sha256")
        if self.hub._announced.get(oid, len(body)) != len(body):
            raise HubError(400, "Uploaded content does not have the announced size")
        self.hub.lfs_objects[oid] = body
        return 200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}

    def h_resolve(self, body, kind, ns, name, rev, path):
        commit = self._commit(self._repo(kind, ns, name), rev)
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if (blob := commit.files.get(path)) is None:  # X-Repo-Commit lets the client cache the miss
            raise HubError(404, "Entry not found", "EntryNotFound", headers=headers)
        headers |= {"ETag": f'"{blob.sha256 if blob.lfs else blob.git_oid}"',
                    "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers |= {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": len(blob.data)}
        data, status = blob.data, 200
        if self.command == "GET" and (m := re.fullmatch(r"bytes=(\d*)-(\d*)",
                                                         self.headers.get("Range", ""))):
            if m.group(1):  # bytes=a-b, bytes=a-
                start = int(m.group(1))
                end = min(int(m.group(2) or len(data) - 1), len(data) - 1)
            elif m.group(2):  # bytes=-n: the last n bytes
                start, end = max(len(data) - int(m.group(2)), 0), len(data) - 1
            else:
                raise HubError(416, "Range not satisfiable")
            if start >= len(data) or end < start:
                raise HubError(416, "Range not satisfiable",
                               headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        if self.command == "GET":  # what a client read of each file: header-only tests count it
            with self.hub._lock:
                key = f"{ns}/{name}/{path}"
                self.hub.served[key] = self.hub.served.get(key, 0) + len(data)
        return status, data, headers


def configure_hf_client(monkeypatch, endpoint: str, *, home, token: str | None = "hf_test_token",
                        offline: bool = False) -> None:
    """Point the already-imported huggingface_hub (and transformers, which reads its constants)
    at `endpoint`, caches under `home`, Xet and telemetry off. `monkeypatch`: pytest's fixture."""
    from huggingface_hub import constants, hf_api

    home = Path(home)
    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"), "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"), "AGENT_HARNESSES_PATH": str(home / "agents.json"),
        "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_OFFLINE": offline,
    }.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)  # module-level upload_folder, model_info...
    for name, value in {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
                        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1" if offline else "0",
                        "HF_TOKEN": token}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE",
                 "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
