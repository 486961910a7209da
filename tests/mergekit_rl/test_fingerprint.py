"""Default provenance fingerprints: sampled content, so models of one shape differ, a copy
matches, and the cost is a few windows per tensor rather than a second read of the model."""

import hashlib
import json
import os
import shutil
import struct

import pytest
from click.testing import CliRunner

from mergekit_rl.checkpoint import SAMPLE_BYTES, Checkpoint
from mergekit_rl.cli import main

VARIANT = "llama_untied_fp32_sharded"


def _prints(folder):
    with Checkpoint.open(folder) as ckpt:
        return [(f["file"], f["bytes"], f["sample_sha256"]) for f in ckpt.fingerprints()]


def _header(file):
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


def test_models_of_one_shape_get_different_fingerprints(tiny_models):
    m = tiny_models[VARIANT]
    roles = ("base", "sft", "grpo", "instruct")
    prints = {role: dict((f, sha) for f, _, sha in _prints(m[role])) for role in roles}
    collisions = 0
    for name in prints["sft"]:
        for a in roles:
            for b in roles[roles.index(a) + 1:]:
                if name not in prints[a] or name not in prints[b]:
                    continue
                # the old fingerprint, the header's sha256, cannot tell these apart
                collisions += _header(m[a] / name) == _header(m[b] / name)
                assert prints[a][name] != prints[b][name], (a, b, name)
    assert collisions >= 3


def test_copy_matches_and_a_changed_window_does_not(tmp_path, tiny_models):
    src = tiny_models[VARIANT]["grpo"]
    shutil.copytree(src, tmp_path / "copy")
    assert _prints(tmp_path / "copy") == _prints(src)
    with Checkpoint.open(src) as ckpt:
        info = max(ckpt.tensors.values(), key=lambda t: t.nbytes)
    assert info.nbytes > 3 * SAMPLE_BYTES
    shard = tmp_path / "copy" / info.file.name
    middle = info.offset + (info.nbytes - SAMPLE_BYTES) // 2 + 17  # inside the middle window
    data = bytearray(shard.read_bytes())
    data[middle] ^= 0x40
    shard.write_bytes(bytes(data))
    changed = _prints(tmp_path / "copy")
    assert [p for p in changed if p[0] == shard.name] != [p for p in _prints(src)
                                                          if p[0] == shard.name]
    assert [p for p in changed if p[0] != shard.name] == [p for p in _prints(src)
                                                          if p[0] != shard.name]


def test_fingerprint_reads_only_the_windows(tiny_models, monkeypatch):
    src = tiny_models[VARIANT]["grpo"]
    read = []
    real = os.preadv

    def counting(fd, buffers, offset):
        n = real(fd, buffers, offset)
        read.append(n)
        return n

    with Checkpoint.open(src) as ckpt:
        monkeypatch.setattr(os, "preadv", counting)
        ckpt.fingerprints()
        monkeypatch.undo()
        bound = sum(min(t.nbytes, 3 * SAMPLE_BYTES) for t in ckpt.tensors.values())
        total = ckpt.total_bytes
    assert 0 < sum(read) <= bound < total  # big tensors: three windows, not all of them


@pytest.mark.parametrize("full", [False, True])
def test_provenance_records_tell_inputs_apart(tmp_path, tiny_models, full):
    m = tiny_models[VARIANT]
    args = ["extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q"] + (["--hash"] * full)
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "vec" / "provenance.json").read_text())
    key = "sha256" if full else "sample_sha256"
    grpo, sft = ([f[key] for f in i["files"]] for i in rec["inputs"])
    assert len(grpo) >= 3 and all(a != b for a, b in zip(grpo, sft))
    if full:
        assert grpo[0] == hashlib.sha256(
            (m["grpo"] / rec["inputs"][0]["files"][0]["file"]).read_bytes()).hexdigest()
    card = (tmp_path / "vec" / "README.md").read_text()
    assert ("sampled sha256" in card) != full and f"`{grpo[0][:12]}`" in card
