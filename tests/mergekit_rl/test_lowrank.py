"""Low-rank vectors: the truncated SVD against hand-made spectra and deltas of known rank; the
folder against peft itself (PeftModel.from_pretrained on the base, merged) and `add`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import load_state, snapshot
from safetensors.torch import save_file

from mergekit_rl.checkpoint import folder_kind
from mergekit_rl.cli import main
from mergekit_rl.maths.lowrank import energy_rank, randomized_svd, truncated_svd


def cli(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def low_rank(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / r


# ---- the maths ---------------------------------------------------------------------------------

def test_energy_rank_by_hand():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: kept 0.643, 0.929, 1
    assert energy_rank(s, 14.0, 0.5) == 1
    assert energy_rank(s, 14.0, 0.9) == 2
    assert energy_rank(s, 14.0, 0.93) == 3
    assert energy_rank(s, 14.0, 1.0) == 3
    assert energy_rank(s[:2], 14.0, 0.95) is None  # the top two keep only 13/14
    assert energy_rank(s, 0.0, 0.99) == 0


def test_diagonal_delta_truncates_to_its_largest_entries():
    delta = torch.diag(torch.tensor([1.0, 4.0, 2.0]))  # singular values 4, 2, 1
    t = truncated_svd(delta, rank=2)
    assert t.rank == 2 and t.method == "exact"
    torch.testing.assert_close(t.s, torch.tensor([4.0, 2.0]))
    b, a = t.factors()
    torch.testing.assert_close(b @ a, torch.diag(torch.tensor([0.0, 4.0, 2.0])), atol=1e-6,
                               rtol=0)
    assert t.energy == pytest.approx(20 / 21)
    assert truncated_svd(delta, energy=0.96).rank == 3  # 20/21 = 0.952 < 0.96
    assert truncated_svd(delta, energy=0.9).rank == 2


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_known_rank_recovered_to_fp32_rounding(method):
    delta = low_rank(300, 200, 5, seed=1)
    t = truncated_svd(delta, rank=5, method=method, generator=torch.Generator().manual_seed(3))
    b, a = t.factors()
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=2e-6 * delta.abs().max().item())
    assert t.energy == pytest.approx(1.0, abs=1e-6)
    # energy search finds the rank too, on either path
    e = truncated_svd(delta, energy=0.999999, method=method)
    assert e.rank == 5


def test_randomized_is_seeded_and_close_to_exact_on_a_full_rank_matrix():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(400, 300, generator=g)
    one = randomized_svd(delta, 8, torch.Generator().manual_seed(7))
    two = randomized_svd(delta, 8, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    exact = torch.linalg.svdvals(delta)[:8]
    torch.testing.assert_close(one[1], exact, rtol=2e-2, atol=0)  # power iterations converge


def test_truncated_svd_rejects_bad_arguments():
    with pytest.raises(ValueError, match="smaller side"):
        truncated_svd(torch.ones(3, 5), rank=4)
    with pytest.raises(ValueError, match="exactly one"):
        truncated_svd(torch.ones(3, 5), rank=1, energy=0.5)


# ---- the folder, against peft --------------------------------------------------------------

@pytest.fixture
def known_rank(tmp_path, tiny_models):
    """(base, ft) where every 2-D delta has rank 2 and every 1-D delta is arbitrary."""
    base = tiny_models["llama_untied_fp32_sharded"]["base"]
    state = load_state(base)
    g = torch.Generator().manual_seed(5)
    for i, (k, v) in enumerate(sorted(state.items())):
        if v.dim() == 2:
            state[k] = v + 0.1 * low_rank(*v.shape, 2, seed=i)
        else:
            state[k] = v + 0.01 * torch.randn(v.shape, generator=g)
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file(state, str(ft / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", ft / "config.json")
    return base, ft


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_extract_rank_recovers_a_known_rank_delta(tmp_path, known_rank, svd):
    base, ft = known_rank
    cli("extract", ft, base, "-o", tmp_path / "lr", "--rank", "2", "--svd", svd, "-q")
    assert folder_kind(tmp_path / "lr") == "adapter"
    cli("add", base, tmp_path / "lr", "-o", tmp_path / "back", "-q")
    back, want = load_state(tmp_path / "back"), load_state(ft)
    assert set(back) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=3e-6), k
    rec = json.loads((tmp_path / "lr" / "provenance.json").read_text())
    lr = rec["lowrank"]
    assert lr["rank"] == 2 and lr["bytes"] < lr["dense_bytes"]
    factored = [s for s in lr["tensors"].values() if s["stored"] == "lora"]
    assert factored and all(s["rank"] == 2 and s["energy"] > 0.99999 for s in factored)
    assert all(s["stored"] == "dense" for k, s in lr["tensors"].items() if "norm" in k)
    card = (tmp_path / "lr" / "README.md").read_text()
    assert "## Low rank" in card and "MB dense" in card and "PeftModel.from_pretrained" in card


@pytest.mark.parametrize("variant", ["llama_untied_fp32_sharded", "qwen2_tied_fp32"])
def test_peft_loads_the_low_rank_vector_like_add(tmp_path, tiny_models, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = tiny_models[variant]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "lr", "--rank", "3", "-q")
    cli("add", m["sft"], tmp_path / "lr", "-o", tmp_path / "ours", "-q")
    model = AutoModelForCausalLM.from_pretrained(m["sft"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, tmp_path / "lr").merge_and_unload().state_dict()
    ours, sft = load_state(tmp_path / "ours"), load_state(m["sft"])
    cfg = json.loads((tmp_path / "lr" / "adapter_config.json").read_text())
    covered = {f"{mod}.weight" for mod in cfg["target_modules"]}
    assert "model.embed_tokens.weight" in covered and len(covered) >= 8
    for k in covered:
        assert not torch.equal(ours[k], sft[k]), k  # the vector does change it
        torch.testing.assert_close(ours[k], merged[k], rtol=0, atol=1e-6), k


def test_compress_by_energy_and_the_record(tmp_path, tiny_models):
    m = tiny_models["qwen2_untied_bf16_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    before = snapshot(tmp_path / "vec")
    cli("compress", tmp_path / "vec", "-o", tmp_path / "lr", "--energy", "0.6", "-q")
    assert snapshot(tmp_path / "vec") == before
    rec = json.loads((tmp_path / "lr" / "provenance.json").read_text())["lowrank"]
    vec = load_state(tmp_path / "vec")
    for name, s in rec["tensors"].items():
        if s["stored"] == "lora":
            exact = torch.linalg.svdvals(vec[name].float())
            kept = torch.cumsum(exact ** 2, 0) / (exact ** 2).sum()
            assert s["rank"] == int((kept < 0.6 - 1e-12).sum()) + 1, name  # the smallest rank
            assert s["energy"] == pytest.approx(float(kept[s["rank"] - 1]), rel=1e-4)
    assert rec["layers"] and all(0.6 <= g["energy"] <= 1 for g in rec["layers"])
    # inspect and compress again read it
    assert f"(low-rank vector): {len(vec)} tensors" in cli("inspect", tmp_path / "lr").output
    cli("compress", tmp_path / "lr", "-o", tmp_path / "lr2", "--rank", "1", "-q")


def test_merge_and_subtract_accept_low_rank_vectors(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "lr", "--rank", "4", "-q")
    cli("add", m["instruct"], tmp_path / "lr", "-o", tmp_path / "add", "-q", "--alpha", "0.7")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"target: {m['instruct']}\nterms:\n  - {{vector: {tmp_path / 'lr'}, "
                        "weight: 0.7}\n")
    cli("merge", manifest, "-o", tmp_path / "merge", "-q")
    cli("subtract", tmp_path / "add", tmp_path / "lr", "-o", tmp_path / "back", "-q",
        "--alpha", "0.7")
    add, merge, back = (load_state(tmp_path / n) for n in ("add", "merge", "back"))
    inst = load_state(m["instruct"])
    for k, v in inst.items():
        torch.testing.assert_close(merge[k], add[k], rtol=0, atol=1e-6), k
        torch.testing.assert_close(back[k], v, rtol=0, atol=1e-6), k


def test_low_rank_bad_input_one_line_nothing_written(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    before = snapshot(m["grpo"].parent)
    r = cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "a", "--rank", "100", ok=False)
    assert r.exit_code == 1 and "--rank 100" in r.output and "k_proj" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "b", "--rank", "2", "--energy",
            "0.9", ok=False)
    assert r.exit_code == 1 and "--rank and --energy" in r.output
    r = cli("compress", m["grpo"], "-o", tmp_path / "c", ok=False)
    assert r.exit_code == 1 and "--rank" in r.output
    assert not any((tmp_path / n).exists() for n in "abc")
    assert snapshot(m["grpo"].parent) == before


def test_iter_deltas_is_what_add_applies(tmp_path, tiny_models):
    from mergekit_rl.adapter import iter_deltas

    m = tiny_models["llama_untied_fp32_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "lr", "--rank", "3", "-q")
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "dense", "-q")
    cli("add", m["instruct"], tmp_path / "lr", "-o", tmp_path / "out", "-q", "--alpha", "0.5")
    out, inst = load_state(tmp_path / "out"), load_state(m["instruct"])
    deltas = dict(iter_deltas(tmp_path / "lr"))
    for k, v in inst.items():
        want = v + 0.5 * deltas[k] if k in deltas else v
        torch.testing.assert_close(out[k], want, rtol=0, atol=1e-6)
    dense = dict(iter_deltas(tmp_path / "dense"))
    assert set(dense) == set(inst) and all(d.dtype == torch.float32 for d in dense.values())


def test_low_rank_of_an_adapter_stores_only_what_it_adapts(tmp_path, tiny_models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = tiny_models["llama_untied_fp32_sharded"]
    model = AutoModelForCausalLM.from_pretrained(m["base"], dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp_path / "adapter")
    cli("extract", tmp_path / "adapter", m["base"], "-o", tmp_path / "lr", "--rank", "2", "-q")
    cfg = json.loads((tmp_path / "lr" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]
    cli("add", m["instruct"], tmp_path / "lr", "-o", tmp_path / "a", "-q")
    cli("add", m["instruct"], tmp_path / "adapter", "-o", tmp_path / "b", "-q")
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6), k
