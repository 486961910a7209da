"""The real huggingface_hub / transformers clients against the local fake Hub (`hub_server.py`).

In-process recipe (huggingface_hub is already imported by conftest, so env vars alone are too
late): start a `FakeHub`, then `configure_hf_client(monkeypatch, hub.endpoint, home=tmp_path)`,
which patches `huggingface_hub.constants` (ENDPOINT, HUGGINGFACE_CO_URL_TEMPLATE, caches,
HF_HUB_DISABLE_XET, HF_HUB_OFFLINE, ...) and `huggingface_hub.hf_api.api.endpoint`, and sets
HF_ENDPOINT / HF_HOME / HF_TOKEN / HF_HUB_DISABLE_XET=1 for anything reading the environment.
`test_subprocess_client_with_env_vars_only` shows the subprocess alternative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hub_server import FakeHub, configure_hf_client
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# huggingface_hub's own LFS PUT passes a file object as `data=`, which httpx2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_test_token"
REPO = "test-user/tiny"
README = "---\nlicense: apache-2.0\ntags:\n- merge\n- test\n---\n\n# Tiny\n\nA test model.\n"
CONFIG = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
          "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 64}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = FakeHub(token=TOKEN)
    fake.start()
    configure_hf_client(monkeypatch, fake.endpoint, home=tmp_path / "hf_home", token=TOKEN)
    yield fake
    fake.stop()


@pytest.fixture
def model_dir(tmp_path) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    out = tmp_path / "model"
    out.mkdir()
    weights = {"w": np.arange(3000, dtype=np.float32).reshape(60, 50), "b": np.ones(7, np.float32)}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (out / "README.md").write_text(README)
    (out / "sub").mkdir()
    (out / "sub" / "notes.txt").write_text("nested file\n")
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and ".cache" not in p.parts}


def _upload(hub, model_dir, **kwargs):
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    return api.upload_folder(repo_id=REPO, folder_path=model_dir, **kwargs)


def test_create_repo_exist_ok_twice(hub):
    api = HfApi()
    first = api.create_repo(REPO, exist_ok=True)
    second = api.create_repo(REPO, exist_ok=True)  # 409 + url in the body
    assert first == second == f"{hub.endpoint}/{REPO}"
    assert second.repo_id == REPO
    assert hub.count("POST", r"^/api/repos/create$") == 2
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert api.whoami()["name"] == "test-user"
    private = api.create_repo("someorg/secret", private=True)
    assert private.repo_id == "someorg/secret" and hub.repos["model/someorg/secret"].private


def test_upload_folder_lfs_and_regular_then_download(hub, model_dir, tmp_path):
    info = _upload(hub, model_dir, commit_message="add model")
    repo = hub.repos[f"model/{REPO}"]
    assert info.oid == repo.branches["main"] and info.commit_message == "add model"
    assert {k: v for k, v in repo.files.items() if k != ".gitattributes"} == _files(model_dir)

    # LFS path for the safetensors file, regular (inline base64) for the rest.
    assert hub.count("POST", r"^/api/validate-yaml$") == 2  # upload_folder, then create_commit
    assert hub.count("POST", rf"^/api/models/{REPO}/preupload/main$") == 1
    assert hub.count("POST", rf"^/{REPO}\.git/info/lfs/objects/batch$") == 1
    assert hub.count("PUT", r"^/lfs-upload/[0-9a-f]{64}$") == 1
    assert hub.count("POST", rf"^/{REPO}\.git/info/lfs/objects/verify$") == 1
    assert hub.count("POST", rf"^/api/models/{REPO}/commit/main$") == 1
    batch = next(h for m, p, h in hub.requests if p.endswith("/objects/batch"))
    assert batch["accept"] == "application/vnd.git-lfs+json"
    assert batch["authorization"] == f"Bearer {TOKEN}"
    assert repo.resolve("main").files["model.safetensors"].lfs
    assert not repo.resolve("main").files["config.json"].lfs

    mi = HfApi().model_info(REPO)
    assert mi.id == REPO and mi.sha == info.oid and mi.private is False
    assert {s.rfilename for s in mi.siblings} == {".gitattributes", *_files(model_dir)}
    assert mi.card_data.license == "apache-2.0" and mi.tags == ["merge", "test"]
    mi = HfApi().model_info(REPO, files_metadata=True)
    lfs = {s.rfilename: s.lfs for s in mi.siblings}
    assert lfs["model.safetensors"].size == (model_dir / "model.safetensors").stat().st_size
    assert lfs["config.json"] is None
    assert sorted(HfApi().list_repo_files(REPO)) == sorted([".gitattributes", *_files(model_dir)])
    top = {e.path for e in HfApi().list_repo_tree(REPO)}
    assert top == {".gitattributes", "README.md", "config.json", "model.safetensors", "sub"}

    snap = Path(snapshot_download(REPO))
    assert {k: v for k, v in _files(snap).items() if k != ".gitattributes"} == _files(model_dir)
    assert snap.name == info.oid
    local = tmp_path / "local"
    snapshot_download(REPO, local_dir=local)
    assert _files(model_dir).items() <= _files(local).items()
    for name in ("model.safetensors", "config.json", "sub/notes.txt"):
        fresh = hf_hub_download(REPO, name, cache_dir=tmp_path / "other_cache")
        assert Path(fresh).read_bytes() == (model_dir / name).read_bytes()
    assert hub.count("HEAD", rf"^/{REPO}/resolve/") >= 3
    assert hub.count("GET", rf"^/api/models/{REPO}/revision/main$") == 2  # then by commit oid:
    assert hub.count("GET", rf"^/api/models/{REPO}/tree/{info.oid}\?recursive=true") == 2

    # Re-uploading identical content is a no-op: preupload returns the remote oids.
    again = _upload(hub, model_dir)
    assert again.oid == info.oid
    assert hub.count("POST", rf"^/api/models/{REPO}/commit/main$") == 1


def test_upload_folder_create_pr(hub, model_dir):
    main_oid = _upload(hub, model_dir).oid
    (model_dir / "config.json").write_text(json.dumps({**CONFIG, "hidden_size": 32}))
    info = HfApi().upload_folder(repo_id=REPO, folder_path=model_dir, create_pr=True)
    assert info.pr_url == f"{hub.endpoint}/{REPO}/discussions/1"
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert any("create_pr=1" in p for m, p, _ in hub.requests if "/commit/main" in p)
    repo = hub.repos[f"model/{REPO}"]
    assert repo.branches["main"] == main_oid and repo.branches["refs/pr/1"] == info.oid
    assert json.loads(repo.files["config.json"])["hidden_size"] == 16
    pr_file = hf_hub_download(REPO, "config.json", revision="refs/pr/1")
    assert json.loads(Path(pr_file).read_text())["hidden_size"] == 32
    assert set(repo.branches) == {"main", "refs/pr/1"}

    HfApi().create_branch(REPO, branch="dev")
    HfApi().create_branch(REPO, branch="dev", exist_ok=True)  # 409 tolerated
    dev = HfApi().upload_file(path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id=REPO,
                              revision="dev")
    assert repo.branches["dev"] == dev.oid and repo.commits[dev.oid].parent == main_oid
    assert "dev.txt" not in repo.files
    assert Path(hf_hub_download(REPO, "dev.txt", revision="dev")).read_bytes() == b"dev"


def test_retries_preupload_and_lfs_put_but_not_commit(hub, model_dir, monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub.utils import _http

    waits = []  # http_backoff sleeps 1 s, 2 s, ... between tries: record instead of waiting
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=waits.append))
    hub.fail_next("POST", r"/preupload/", 500)
    hub.fail_next("PUT", r"^/lfs-upload/", 503, times=2)
    info = _upload(hub, model_dir)
    assert hub.count("POST", r"/preupload/") == 2
    assert hub.count("PUT", r"^/lfs-upload/") == 3
    assert waits == [1, 1, 2]  # preupload once; the PUT twice with exponential backoff
    assert hub.repos[f"model/{REPO}"].branches["main"] == info.oid

    # The commit POST itself is sent once (no backoff) and a 500 surfaces as HfHubHTTPError.
    (model_dir / "config.json").write_text("{}")
    hub.fail_next("POST", r"/commit/", 500)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi().upload_folder(repo_id=REPO, folder_path=model_dir)
    assert err.value.response.status_code == 500
    assert "Injected failure" in str(err.value) and err.value.request_id
    assert hub.count("POST", r"/commit/") == 2  # one success above, one failure, no retry
    assert hub.repos[f"model/{REPO}"].branches["main"] == info.oid


def test_wrong_token_is_401_http_error(hub, model_dir):
    api = HfApi(token="hf_wrong")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 401
    assert not isinstance(err.value, RepositoryNotFoundError)
    assert "Invalid credentials" in str(err.value)
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        api.whoami()
    with pytest.raises(HfHubHTTPError) as err:  # no token at all on a write
        HfApi(token=False).create_repo(REPO)
    assert err.value.response.status_code == 401
    HfApi().create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(repo_id=REPO, folder_path=model_dir)
    assert err.value.response.status_code == 401
    assert hub.count("POST", "/commit/") == 0


def test_missing_repo_revision_and_file_errors(hub, model_dir, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("test-user/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/nope", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("test-user/nope")
    _upload(hub, model_dir)
    with pytest.raises(RevisionNotFoundError):
        HfApi().model_info(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="nope")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json")
    assert not HfApi().file_exists(REPO, "missing.json")
    assert HfApi().file_exists(REPO, "config.json")

    # Private repos: invisible (401 RepoNotFound) without a token, readable with it.
    HfApi().create_repo("test-user/private", private=True)
    HfApi().upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="test-user/private")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("test-user/private")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/private", "config.json", token=False,
                        cache_dir=tmp_path / "anon")
    assert HfApi().model_info("test-user/private").private is True
    assert Path(hf_hub_download("test-user/private", "config.json")).read_bytes() == b"{}"


def test_offline_mode_fails_fast(monkeypatch, tmp_path):
    fake = FakeHub()
    fake.start()
    try:
        configure_hf_client(monkeypatch, fake.endpoint, home=tmp_path, offline=True)
        start = time.monotonic()
        with pytest.raises(LocalEntryNotFoundError):
            snapshot_download(REPO)
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download(REPO, "config.json")
        assert time.monotonic() - start < 2
        assert fake.requests == []
    finally:
        fake.stop()


def test_transformers_autoconfig_through_fake(hub, model_dir):
    transformers = pytest.importorskip("transformers")
    oid = _upload(hub, model_dir).oid
    config = transformers.AutoConfig.from_pretrained(REPO)
    assert config.model_type == "llama" and config.hidden_size == 16
    # transformers 5 resolves "main" (through GET /api/models/{repo}, unless an earlier test in
    # this process left the resolution cached), then fetches the file by commit oid.
    assert hub.count("GET", rf"^/{REPO}/resolve/({oid}|main)/config.json$") == 1


def test_invalid_yaml_and_unknown_lfs_oid_rejected(hub, model_dir):
    (model_dir / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        _upload(hub, model_dir)
    assert hub.count("POST", "/commit/") == 0

    ndjson = b"\n".join(json.dumps(x).encode() for x in [
        {"key": "header", "value": {"summary": "sneaky", "description": ""}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "ab" * 32, "size": 3}},
    ])
    req = urllib.request.Request(f"{hub.endpoint}/api/models/{REPO}/commit/main", data=ndjson,
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/x-ndjson"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 422 and err.value.headers["X-Request-Id"]
    assert "never uploaded" in json.loads(err.value.read())["error"]


def test_range_and_head_headers(hub, model_dir):
    _upload(hub, model_dir)
    url = f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors"
    data = (model_dir / "model.safetensors").read_bytes()
    head = urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5)
    assert int(head.headers["Content-Length"]) == len(data) == int(head.headers["X-Linked-Size"])
    assert head.headers["X-Repo-Commit"] == hub.repos[f"model/{REPO}"].branches["main"]
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"]
    part = urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=8-"}),
                                  timeout=5)
    assert part.status == 206 and part.read() == data[8:]
    for spec, want in (("bytes=0-7", data[:8]), ("bytes=-5", data[-5:]),
                       ("bytes=3-3", data[3:4]), (f"bytes=10-{len(data) + 99}", data[10:])):
        part = urllib.request.urlopen(urllib.request.Request(url, headers={"Range": spec}),
                                      timeout=5)
        assert part.status == 206 and part.read() == want, spec
        assert part.headers["Content-Range"].endswith(f"/{len(data)}")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, headers={
            "Range": f"bytes={len(data)}-"}), timeout=5)
    assert err.value.code == 416
    served = hub.served[f"{REPO}/model.safetensors"]
    assert served == (len(data) - 8) + 8 + 5 + 1 + (len(data) - 10)  # GETs only, not HEAD


def test_subprocess_client_with_env_vars_only(hub, model_dir, tmp_path):
    _upload(hub, model_dir)
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "sub_home"),
           "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    code = ("import sys; from huggingface_hub import snapshot_download; "
            f"print(snapshot_download({REPO!r}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip().splitlines()[-1]
    assert (Path(out) / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()


def test_dataset_repo_delete_and_fail_plan(monkeypatch, tmp_path, model_dir):
    from huggingface_hub.errors import GatedRepoError

    fake = FakeHub(fail_plan={("HEAD", r"/resolve/main/gated\.txt$"): (401, 1, "GatedRepo")})
    fake.start()
    try:
        configure_hf_client(monkeypatch, fake.endpoint, home=tmp_path / "home")
        api = HfApi()
        url = api.create_repo("test-user/data", repo_type="dataset")
        assert url == f"{fake.endpoint}/datasets/test-user/data" and url.repo_type == "dataset"
        api.upload_folder(repo_id="test-user/data", repo_type="dataset", folder_path=model_dir)
        assert fake.count("POST", r"^/datasets/test-user/data\.git/info/lfs/objects/batch$") == 1
        snap = Path(snapshot_download("test-user/data", repo_type="dataset"))
        assert (snap / "sub" / "notes.txt").read_text() == "nested file\n"
        assert [e.path for e in api.list_repo_tree("test-user/data", "sub", repo_type="dataset")] \
            == ["sub/notes.txt"]
        api.delete_file("sub/notes.txt", "test-user/data", repo_type="dataset")
        assert "sub/notes.txt" not in fake.repos["dataset/test-user/data"].files
        with pytest.raises(EntryNotFoundError):
            api.delete_file("sub/notes.txt", "test-user/data", repo_type="dataset")
        api.upload_file(path_or_fileobj=b"x", path_in_repo="gated.txt", repo_id="test-user/data",
                        repo_type="dataset")
        with pytest.raises(GatedRepoError):
            hf_hub_download("test-user/data", "gated.txt", repo_type="dataset")
        assert hf_hub_download("test-user/data", "gated.txt", repo_type="dataset")  # once only
    finally:
        fake.stop()


def test_stop_drops_pooled_connections(hub):
    import httpx2

    HfApi().create_repo(REPO)
    assert HfApi().model_info(REPO).id == REPO  # leaves a keep-alive connection in the pool
    hub.stop()
    start = time.monotonic()
    with pytest.raises(httpx2.ConnectError):  # not served by the stopped hub's handler thread
        HfApi().model_info(REPO)
    assert time.monotonic() - start < 2
