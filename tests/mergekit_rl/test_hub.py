"""Publishing and loading by repo id through the real huggingface_hub client, against the local
FakeHub (tests/hub_server.py) on 127.0.0.1: only the endpoint is replaced, not our code."""

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import assert_failed, load_state, snapshot
from hub_server import FakeHub, configure_hf_client, front_matter

from mergekit_rl import hub as hub_mod
from mergekit_rl.cli import main

TOKEN = "hf_secret_token_for_tests_123"
REPO_MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "train"


@pytest.fixture
def fake(monkeypatch, tmp_path):
    with FakeHub(token=TOKEN) as server:
        configure_hf_client(monkeypatch, server.endpoint, home=tmp_path / "hf_home", token=TOKEN)
        monkeypatch.setattr(hub_mod, "RETRY_DELAYS", (0.0, 0.0, 0.0))
        import huggingface_hub.utils._http as http

        monkeypatch.setattr(http.time, "sleep", lambda s: None)
        yield server


def cli(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def test_push_then_load_by_repo_id_bit_identical(fake, tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    m = tiny_models["qwen2_untied_bf16_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    r = cli("add", m["instruct"], tmp_path / "vec", "-o", tmp_path / "merged", "-q",
            "--push-to-hub", "org/merged", "--private")
    assert "pushed" in r.output and "org/merged" in r.output
    assert fake.repos["model/org/merged"].private
    assert fake.count("POST", r"/info/lfs/objects/batch") >= 1  # safetensors went the LFS way
    model = AutoModelForCausalLM.from_pretrained("org/merged", dtype=torch.bfloat16)
    local = load_state(tmp_path / "merged")
    state = model.state_dict()
    for k, v in local.items():
        assert torch.equal(state[k], v), k
    card = fake.repos["model/org/merged"].files["README.md"].decode()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "reasoning-vector" in meta["tags"]
    assert fake.count("POST", r"/api/validate-yaml") >= 1


def test_add_by_repo_ids_equals_local(fake, tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q", "--push-to-hub", "org/vec")
    import shutil

    shutil.copytree(m["instruct"], tmp_path / "instruct")
    (tmp_path / "instruct" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# x\n")
    cli("push", tmp_path / "instruct", "org/instruct")
    cli("add", "org/instruct", "org/vec@main", "-o", tmp_path / "remote", "-q")
    cli("add", m["instruct"], tmp_path / "vec", "-o", tmp_path / "local", "-q")
    a, b = load_state(tmp_path / "remote"), load_state(tmp_path / "local")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rec = (tmp_path / "remote" / "provenance.json").read_text()
    assert '"repo_id": "org/instruct"' in rec and '"commit"' in rec
    meta = front_matter((tmp_path / "remote" / "README.md").read_text())
    assert meta["base_model"] == ["org/instruct", "org/vec"]
    assert meta["license"] == "apache-2.0"  # copied from the target's card
    assert meta["base_model_relation"] == "merge"
    assert "sha256" in rec  # content hash of Hub files taken from the cache


def test_token_never_written(fake, tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q", "--push-to-hub", "org/v")
    cli("add", "org/v", tmp_path / "vec", "-o", tmp_path / "x", "--allow-vocab-mismatch", ok=False)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f
    for repo in fake.repos.values():
        for name, data in repo.files.items():
            assert TOKEN.encode() not in data, name


def test_wrong_token_is_clear_and_local_untouched(fake, tmp_path, tiny_models, monkeypatch):
    m = tiny_models["qwen2_tied_fp32"]
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    before = snapshot(m["base"])
    r = cli("push", m["base"], "org/base", ok=False)
    assert r.exit_code == 1 and "org/base" in r.output and "401" in r.output
    assert "hf_wrong" not in r.output and "Traceback" not in r.output
    assert snapshot(m["base"]) == before


def test_commit_500_then_success(fake, tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    fake.fail_next("POST", r"/commit/", 500, times=2)
    r = cli("push", m["base"], "org/retry")
    assert "pushed" in r.output
    assert "model.safetensors" in fake.repos["model/org/retry"].files


def test_missing_repo_and_revision(fake, tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    r = cli("add", "org/nothing", m["base"], "-o", tmp_path / "o", ok=False)
    assert r.exit_code == 1 and "org/nothing: no local folder" in r.output
    assert "no Hub repository org/nothing (repository not found" in r.output
    cli("push", m["base"], "org/base")
    r = cli("add", "org/base@nobranch", m["base"], "-o", tmp_path / "o", ok=False)
    assert r.exit_code == 1 and "revision 'nobranch' not found" in r.output
    assert not (tmp_path / "o").exists()


def test_offline_is_clear(fake, tmp_path, tiny_models, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    m = tiny_models["qwen2_tied_fp32"]
    r = cli("add", "org/uncached", m["base"], "-o", tmp_path / "o", ok=False)
    assert r.exit_code == 1 and "HF_HUB_OFFLINE" in r.output
    r = cli("push", m["base"], "org/x", ok=False)
    assert r.exit_code == 1 and "HF_HUB_OFFLINE is set" in r.output


def test_large_folder_multi_commit_resumes(fake, tmp_path, monkeypatch):
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(3):
        (folder / f"model-{i}.safetensors").write_bytes(bytes([i]) * (11 * 2**20))
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(hub_mod, "SMALL_FILE", 2**20)
    r = hub_mod.push(folder, "org/big", max_commit_bytes=12 * 2**20)
    assert r.commits == 4 and not r.skipped  # three shards one by one, then the small files
    again = hub_mod.push(folder, "org/big", max_commit_bytes=12 * 2**20)
    assert sorted(again.skipped) == [f"model-{i}.safetensors" for i in range(3)]
    assert fake.repos["model/org/big"].files["model-2.safetensors"] == bytes([2]) * (11 * 2**20)


def test_create_pr_and_revision(fake, tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    cli("push", m["base"], "org/pr")
    r = cli("push", m["instruct"], "org/pr", "--create-pr", "-m", "try instruct")
    assert "discussions" in r.output or "pr" in r.output.lower()
    cli("push", m["sft"], "org/pr", "--revision", "sft-branch")
    repo = fake.repos["model/org/pr"]
    assert "sft-branch" in repo.branches


def test_manifest_push_section(fake, tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump({
        "target": str(m["instruct"]), "output": {"path": "merged"},
        "terms": [{"plus": str(m["grpo"]), "minus": str(m["sft"])}],
        "push": {"repo_id": "org/from-manifest", "private": True}}))
    cli("merge", p, "-q")
    assert fake.repos["model/org/from-manifest"].private
    assert "merge.yaml" in fake.repos["model/org/from-manifest"].files


def test_trainer_push_to_hub_with_card(fake, tmp_path):
    # A 2-step SFT run pushed at the end: weights, tokenizer and a card with the recipe and the
    # final metrics travel; checkpoints stay local; the token is in no file.
    from reasoning_demo.tiny import build_model, build_tokenizer

    build_tokenizer(tmp_path / "tok")
    start = build_model(tmp_path / "start", hidden_size=32, intermediate_size=64, num_layers=2,
                        tied=True, tokenizer_dir=tmp_path / "tok")
    out = tmp_path / "run"
    cli("train", "sft", REPO_MANIFESTS / "sft_tiny.yaml", "--set", f"model.path={start}",
        "--set", f"train.output_dir={out}",
        "--set", "train.max_steps=2", "--set", "train.save_steps=1",
        "--set", "train.batch_size=4", "--set", "train.micro_batch_size=4",
        "--set", "train.report_to=[none]", "-q", "--push-to-hub", "org/sft-run")
    assert (out / "checkpoint-2").is_dir()
    files = fake.repos["model/org/sft-run"].files
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md",
            "trainer_config.yaml"} <= set(files)
    assert not [f for f in files if f.startswith("checkpoint-")]
    text = files["README.md"].decode()
    meta, body = front_matter(text), text
    assert meta["library_name"] == "transformers" and "sft" in meta["tags"]
    assert "## Final metrics" in body and "| loss |" in body and "max_steps: 2" in body
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f


def test_trainer_push_failure_keeps_the_run(fake, tmp_path, tiny_models, monkeypatch):
    from reasoning_demo.tiny import build_model, build_tokenizer

    build_tokenizer(tmp_path / "tok")
    start = build_model(tmp_path / "start", hidden_size=32, intermediate_size=64, num_layers=2,
                        tied=True, tokenizer_dir=tmp_path / "tok")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    out = tmp_path / "run"
    r = cli("train", "sft", REPO_MANIFESTS / "sft_tiny.yaml", "--set", f"model.path={start}",
            "--set", f"train.output_dir={out}",
            "--set", "train.max_steps=1", "--set", "train.batch_size=4",
            "--set", "train.micro_batch_size=4", "--set", "train.report_to=[none]", "-q",
            "--push-to-hub", "org/x", ok=False)
    assert r.exit_code == 1 and "org/x" in r.output and str(out) in r.output
    assert (out / "model.safetensors").is_file()


# ---- what a new user trips over: missing paths shaped like org/name, no network ---------------

@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """The Hub endpoint is a local port nobody listens on: connections are refused, as without
    a network (HF_HUB_OFFLINE unset)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    configure_hf_client(monkeypatch, endpoint, home=tmp_path / "hf_home", token=None)
    return endpoint


def test_missing_local_path_shaped_like_a_hub_id(no_network, tmp_path, tiny_models,
                                                 monkeypatch):
    m = tiny_models["qwen2_tied_fp32"]
    monkeypatch.chdir(tmp_path)
    before = {m["base"]: snapshot(m["base"])}
    # the README's own command before runs/ exists
    r = cli("extract", "runs/grpo", "runs/sft", "-o", "reasoning-vector", ok=False)
    assert_failed(r, tmp_path / "reasoning-vector", {},
                  f"runs/grpo: no local folder {tmp_path / 'runs' / 'grpo'}, and the Hub could "
                  "not be reached (ConnectError")
    r = cli("add", m["base"], "out/reasoning-vectr", "-o", "x", ok=False)
    assert_failed(r, tmp_path / "x", before, "out/reasoning-vectr: no local folder",
                  "the Hub could not be reached")
    r = cli("inspect", "out/reasoning-vectr", ok=False)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "the Hub could not be reached" \
        in r.output
    r = cli("add", "Qwen/Qwen2.5-1.5B-Instruct", m["base"], "-o", "y", ok=False)
    assert_failed(r, tmp_path / "y", before, "Qwen/Qwen2.5-1.5B-Instruct: no local folder",
                  "the Hub could not be reached")


@pytest.mark.parametrize("name", ["reasoning_vector_qwen2.5_1.5b.yaml", "ties_two_vectors.yaml",
                                  "dare_ties.yaml", "mergekit_task_arithmetic.yaml"])
def test_dry_run_of_shipped_manifests_without_network(no_network, tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = Path(__file__).resolve().parents[2] / "manifests" / name
    r = cli("merge", path, "--dry-run", ok=False)
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: ") and "Traceback" not in r.output
    assert "no local folder" in r.output and "the Hub could not be reached" in r.output


def test_offline_and_uncached_says_both(fake, tmp_path, tiny_models, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    m = tiny_models["qwen2_tied_fp32"]
    monkeypatch.chdir(tmp_path)
    r = cli("add", m["base"], "runs/vec", "-o", "o", ok=False)
    assert_failed(r, tmp_path / "o", {}, f"runs/vec: no local folder {tmp_path / 'runs' / 'vec'}, "
                  "and HF_HUB_OFFLINE is set and it is not in the Hub cache")


def test_trainer_checks_model_path_up_front(no_network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(REPO_MANIFESTS)
    r = cli("train", "sft", REPO_MANIFESTS / "sft_tiny.yaml", "--set", "model.path=runs/sft",
            "--set", f"train.output_dir={tmp_path / 'run'}", ok=False)
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert f"model.path: runs/sft: no local folder {tmp_path / 'runs' / 'sft'}, and the Hub " \
        "could not be reached (ConnectError" in r.output
    assert not (tmp_path / "run").exists() and snapshot(REPO_MANIFESTS) == before
    r = cli("train", "sft", REPO_MANIFESTS / "sft_tiny.yaml", "--set", "model.path=./nothing",
            "--set", f"train.output_dir={tmp_path / 'run'}", ok=False)
    assert r.exit_code == 1 and f"model.path: {tmp_path / 'nothing'}: no such file or folder; " \
        "give a local folder or a Hub id" in r.output
    r = cli("sample", "pairs", REPO_MANIFESTS / "sample_pairs_tiny.yaml", "--set",
            "model.path=runs/sft", "--set", f"output={tmp_path / 'p.jsonl'}", ok=False)
    assert r.exit_code == 1 and "model.path: runs/sft: no local folder" in r.output


# ---- what a Hub download brings ----------------------------------------------------------------

def test_hub_vector_brings_its_mask(fake, tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q", "--exclude", "embed|lm_head",
        "--push-to-hub", "org/masked-vec")
    cli("add", m["instruct"], "org/masked-vec", "-o", tmp_path / "remote", "-q")
    cli("add", m["instruct"], tmp_path / "vec", "-o", tmp_path / "local", "-q")
    a, b = load_state(tmp_path / "remote"), load_state(tmp_path / "local")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    inst = load_state(m["instruct"])
    assert torch.equal(a["lm_head.weight"], inst["lm_head.weight"])


def test_hub_download_takes_only_the_indexed_weights(fake, tmp_path, tiny_models):
    import shutil

    from safetensors.torch import save_file

    m = tiny_models["qwen2_untied_bf16_sharded"]
    repo = tmp_path / "repo"
    shutil.copytree(m["base"], repo)
    save_file(load_state(m["base"]), repo / "consolidated.safetensors")  # as Mistral repos ship
    (repo / "original").mkdir()
    save_file({"x": torch.zeros(2)}, repo / "original" / "other.safetensors")
    cli("push", repo, "org/with-consolidated")
    source = hub_mod.resolve("org/with-consolidated")
    files = sorted(p.name for p in source.path.iterdir())
    shards = sorted(p.name for p in repo.glob("model-*.safetensors"))
    assert "consolidated.safetensors" not in files and "original" not in files
    assert set(shards) | {"model.safetensors.index.json", "config.json"} <= set(files)
    assert fake.count("GET", r"consolidated\.safetensors") == 0


def test_weight_files_rule():
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    names = ["model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "consolidated.safetensors", "README.md"]
    assert hub_mod.weight_files(names, lambda n: index) == [
        "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors"]
    assert hub_mod.weight_files(["model.safetensors", "consolidated.safetensors"],
                                pytest.fail) == ["model.safetensors"]
    assert hub_mod.weight_files(["adapter_model.safetensors", "sub/x.safetensors"],
                                pytest.fail) == ["adapter_model.safetensors"]
    assert hub_mod.weight_files(["pytorch_model.bin"], pytest.fail) == hub_mod.LEGACY_PATTERNS


# ---- pushing: connection errors are retried; a failed --push-to-hub keeps the output -----------

def test_push_retries_connection_errors(fake, tmp_path, tiny_models, monkeypatch):
    import httpx2
    from huggingface_hub import HfApi

    m = tiny_models["qwen2_tied_fp32"]
    real, calls = HfApi.upload_folder, []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) <= 2:
            raise httpx2.ConnectError("[Errno 111] Connection refused")
        return real(self, *a, **k)

    monkeypatch.setattr(HfApi, "upload_folder", flaky)
    r = cli("push", m["base"], "org/flaky")
    assert len(calls) == 3 and "retrying" in r.output and "pushed" in r.output
    assert "model.safetensors" in fake.repos["model/org/flaky"].files
    calls.clear()
    monkeypatch.setattr(hub_mod, "RETRY_DELAYS", (0.0,))

    def down(self, *a, **k):
        calls.append(1)
        raise httpx2.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(HfApi, "upload_folder", down)
    r = cli("push", m["base"], "org/flaky", ok=False)
    assert len(calls) == 2 and r.exit_code == 1 and r.output.count("\n") == 2  # warning + error
    assert "Error: org/flaky: could not upload (ConnectError: [Errno 111] Connection refused)" \
        in r.output


def test_a_bug_inside_push_keeps_its_traceback(fake, tmp_path, tiny_models, monkeypatch):
    from huggingface_hub import HfApi

    def broken(self, *a, **k):
        raise AttributeError("a bug, not a network error")

    monkeypatch.setattr(HfApi, "upload_folder", broken)
    r = cli("push", tiny_models["qwen2_tied_fp32"]["base"], "org/bug", ok=False)
    assert isinstance(r.exception, AttributeError)


def test_failed_push_to_hub_keeps_the_output_and_says_how_to_push(fake, tmp_path, tiny_models,
                                                                  monkeypatch):
    m = tiny_models["qwen2_tied_fp32"]
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    out = tmp_path / "vec"
    r = cli("extract", m["grpo"], m["sft"], "-o", out, "-q", "--push-to-hub", "org/vec", ok=False)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "401" in r.output
    assert f"(the output is kept in {out}; push it later with `mergekit-rl push {out} " \
           "org/vec`)" in r.output
    assert (out / "model.safetensors").is_file() and (out / "provenance.json").is_file()
