"""The layout module: our writer's files load with the reference reader, and bad files fail
with errors naming the file."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_rl.checkpoint import Checkpoint, CheckpointWriter, parse_size
from mergekit_rl.errors import CheckpointError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(11, generator=g).to(torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 4),
        "g.mask": torch.tensor([True, False, True]),
    }


def test_writer_output_loads_with_reference_reader(tmp_path):
    ref = _tensors()
    w = CheckpointWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in ref.items()],
                         max_shard_size=100)
    for name in reversed(list(ref)):  # any order: offsets are fixed up front
        w.write(name, ref[name])
    w.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ref.values())
    got = {}
    for f in set(index["weight_map"].values()):
        with safe_open(tmp_path / f, "pt") as h:
            assert h.metadata()["format"] == "pt"
        got.update(load_file(tmp_path / f))
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k


def test_writer_row_blocks_and_single_file(tmp_path):
    t = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    w = CheckpointWriter(tmp_path, [("t", torch.float32, (10, 4))])
    w.write("t", t[6:], row_start=6)
    w.write("t", t[:6], row_start=0)
    w.finish()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["t"], t)


def test_writer_refuses_unfinished(tmp_path):
    w = CheckpointWriter(tmp_path, [("t", torch.float32, (2, 2))])
    with pytest.raises(RuntimeError, match="not fully written"):
        w.finish()


def test_reader_reads_tensors_and_row_blocks(tmp_path):
    ref = _tensors()
    save_file(ref, tmp_path / "model.safetensors")
    with Checkpoint.open(tmp_path) as ckpt:
        assert set(ckpt.tensors) == set(ref)
        for k, v in ref.items():
            assert torch.equal(ckpt.read(k), v), k
        assert torch.equal(ckpt.read("a.weight", (2, 5)), ref["a.weight"][2:5])
        assert ckpt.total_bytes == sum(v.numel() * v.element_size() for v in ref.values())


def test_reader_follows_index_and_hf_shards(tiny_models):
    path = tiny_models["llama_untied_fp32_sharded"]["base"]
    with Checkpoint.open(path) as ckpt:
        assert len(ckpt.files) >= 3
        ref = {}
        for f in ckpt.files:
            ref.update(load_file(f))
        for k, v in ref.items():
            assert torch.equal(ckpt.read(k), v)


def test_truncated_file_names_file(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors"):
        Checkpoint.open(tmp_path)


def test_garbage_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxx")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        Checkpoint.open(tmp_path)


def test_bad_index_cases(tmp_path, tiny_models):
    src = tiny_models["llama_untied_fp32_sharded"]["base"]
    ck = tmp_path / "ck"
    shutil.copytree(src, ck)
    index_path = ck / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (ck / shard).rename(ck / "moved")
    with pytest.raises(CheckpointError, match=f"shard '{shard}' listed in the index is missing"):
        Checkpoint.open(ck)
    (ck / "moved").rename(ck / shard)
    name = next(iter(index["weight_map"]))
    other = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})[0]
    index["weight_map"][name] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is not in shard"):
        Checkpoint.open(ck)
    index_path.write_text("{")
    with pytest.raises(CheckpointError, match="bad index"):
        Checkpoint.open(ck)


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        Checkpoint.open(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="is this a model folder"):
        Checkpoint.open(tmp_path)


def test_legacy_bin_weights_only(tmp_path):
    ref = {"w": torch.randn(3, 2), "ids": torch.arange(4)}
    torch.save(ref, tmp_path / "pytorch_model.bin")
    with Checkpoint.open(tmp_path) as ckpt:
        assert torch.equal(ckpt.read("w"), ref["w"])
        assert torch.equal(ckpt.read("w", (1, 3)), ref["w"][1:3])


def test_legacy_bin_with_code_is_refused(tmp_path):
    torch.save({"w": torch.zeros(1), "f": print}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot read legacy weights"):
        Checkpoint.open(tmp_path)


@pytest.mark.parametrize("text,expected", [("500MB", 500 * 10**6), ("2GB", 2 * 10**9),
                                           ("1GiB", 2**30), ("1024", 1024), (7, 7)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_junk():
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("lots")


def test_read_into_widens_rows_of_any_dtype_and_refuses_a_short_file(tmp_path):
    """`read_into` (what `compare` reads with): rows of bf16, fp16 and fp32 tensors, at offsets
    that are not page-aligned, flattened into a float32 buffer exactly as `.float()` gives
    them; a file shorter than its header says is one CheckpointError, not a crash."""
    torch.manual_seed(0)
    ref = {"x.pad": torch.randn(3).to(torch.bfloat16),  # makes the next offsets unaligned
           "x.bf16": torch.randn(700, 9).to(torch.bfloat16),
           "x.fp16": torch.randn(50, 3).to(torch.float16),
           "x.fp32": torch.randn(40, 5)}
    save_file(ref, tmp_path / "model.safetensors")
    out = torch.full((10_000,), float("nan"))
    with Checkpoint.open(tmp_path) as ckpt:
        for name, t in ref.items():
            n = ckpt.read_into(name, None, out)
            assert n == t.numel() and torch.equal(out[:n], t.float().reshape(-1)), name
        n = ckpt.read_into("x.bf16", (333, 701 - 1), out)
        assert torch.equal(out[:n], ref["x.bf16"][333:700].float().reshape(-1))
        assert ckpt.read_into("x.fp32", (0, 0), out) == 0
    with Checkpoint.open(tmp_path) as ckpt:
        header = min(info.offset for info in ckpt.tensors.values())
        with open(tmp_path / "model.safetensors", "r+b") as f:  # cut while open
            f.truncate(header + 4)
        for name in ("x.bf16", "x.fp32"):  # mapped, and read
            with pytest.raises(CheckpointError, match="file ended early"):
                ckpt.read_into(name, None, out)
