"""Time `mergekit-rl extract` / `add` against a plain safetensors loop (and optionally mergekit).

Reproduces the SPEC §5 reference measurements on synthetic Llama checkpoints built once under
benchmarks/_cache/. Every timed run is its own subprocess; its peak RSS is that child's
`ru_maxrss` from `os.wait4`. Runs alternate within one invocation (forward order on even
repeats, reversed on odd ones) because timings on these machines drift ±30-60% between
invocations: compare the ratios, not the absolute seconds.

    .venv/bin/python benchmarks/merge_bench.py                      # both sizes, 3 repeats
    .venv/bin/python benchmarks/merge_bench.py --size 0.5 --only plain_add,ours_add
    .venv/bin/python benchmarks/merge_bench.py --mergekit-python /tmp/mkvenv/bin/python

This driver never imports torch: on Linux a child's ru_maxrss starts from the RSS of the
process it was forked from (the old mm is accounted at exec), so a fat driver would inflate
every measurement. The heavy work (building, the plain baseline, snapshots, verification) runs
in subprocesses of this same file (`--_build`, `--_plain`, `--_snap`, `--_verify`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "_cache"
INDEX = "model.safetensors.index.json"
MAX_SHARD = 500 * 1000**2  # "500MB" as transformers counts it
MODELS = ("base", "sft", "grpo")

# Same tensor shapes in both trios, so a difference in peak RSS can only come from model size.
TRIOS = {
    "1.9": {"vocab": 32000, "hidden": 2048, "intermediate": 5632, "layers": 16, "heads": 16},
    "0.5": {"vocab": 32000, "hidden": 2048, "intermediate": 5632, "layers": 2, "heads": 16},
}
RECIPE_VERSION = 1

ALL_RUNS = ("startup", "cat", "read", "plain_extract", "ours_extract", "plain_add", "ours_add",
            "plain_merge", "mergekit", "ours_merge")
# Runs whose output is an add-style bf16 model, checked against plain_add.
ADD_LIKE = ("ours_add", "plain_merge", "mergekit", "ours_merge")


# Three tensors for the correctness spot check: start of the first shard, a big MLP matrix
# in the last layer, and the last tensor written.
def spot_names(layers: int) -> list[str]:
    return ["model.layers.0.self_attn.q_proj.weight",
            f"model.layers.{layers - 1}.mlp.down_proj.weight", "lm_head.weight"]


# ---------------------------------------------------------------------------------------------
# Checkpoint layout helpers (no torch)

def tensor_list(t: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Llama tensor names and shapes in state_dict order."""
    h, f = t["hidden"], t["intermediate"]
    out = [("model.embed_tokens.weight", (t["vocab"], h))]
    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (t["vocab"], h))]
    return out


def shard_plan(tensors, itemsize: int = 2) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy tensor-level packing into shards of at most MAX_SHARD bytes (as transformers)."""
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        n = itemsize
        for d in shape:
            n *= d
        if cur and size + n > MAX_SHARD:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    return shards


def weight_map(folder: Path) -> dict[str, str]:
    idx = folder / INDEX
    if idx.exists():
        return json.loads(idx.read_text())["weight_map"]
    # A single-file checkpoint: read the names from the safetensors header.
    single = folder / "model.safetensors"
    with open(single, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return {k: single.name for k in header if k != "__metadata__"}


def data_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def files_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# Workers (run as subprocesses; these import torch)

def build_trio(dest: Path, trio: dict) -> None:
    """Write base/sft/grpo shard by shard: sft = base + noise, grpo = sft + noise (seeded)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=trio["vocab"], hidden_size=trio["hidden"],
                      intermediate_size=trio["intermediate"],
                      num_hidden_layers=trio["layers"], num_attention_heads=trio["heads"],
                      num_key_value_heads=trio["heads"], max_position_embeddings=2048,
                      tie_word_embeddings=False, dtype="bfloat16",
                      architectures=["LlamaForCausalLM"]).to_dict()
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    cfg["tie_word_embeddings"] = False

    shards = shard_plan(tensor_list(trio))
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = 0
    wmap = {}
    for m in MODELS:
        (dest / m).mkdir(parents=True)
        (dest / m / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    def draw(shape, seed, mean, std):
        g = torch.Generator().manual_seed(seed)
        return torch.empty(shape, dtype=torch.bfloat16).normal_(mean, std, generator=g)

    for file, shard in zip(files, shards):
        out = {m: {} for m in MODELS}
        for name, shape in shard:
            seed = zlib.crc32(name.encode()) * 4
            is_norm = len(shape) == 1
            base = draw(shape, seed, 1.0 if is_norm else 0.0, 0.02)
            sft = base + draw(shape, seed + 1, 0.0, 0.002)
            grpo = sft + draw(shape, seed + 2, 0.0, 0.001)
            for m, t in zip(MODELS, (base, sft, grpo)):
                out[m][name] = t
            wmap[name] = file
            total += base.numel() * 2
        for m in MODELS:
            save_file(out[m], str(dest / m / file), metadata={"format": "pt"})
        del out
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2)
    for m in MODELS:
        (dest / m / INDEX).write_text(index + "\n")


def plain(op: str, out: Path | None, inputs: list[Path]) -> None:
    """The SPEC §5 baseline: per shard of the first input, safe_open → fp32 maths → save_file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if op == "read":  # every tensor of every input, no maths, nothing written
        for folder in inputs:
            for f in files_of(folder):
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():  # noqa: SIM118 (a safe_open handle)
                        # safetensors ≥ 0.6 returns a lazy view of its mmap: copy to touch
                        # every byte, as older versions did.
                        h.get_tensor(name).clone()
        return

    maps = [weight_map(d) for d in inputs]
    out.mkdir(parents=True)
    wmap, total = {}, 0
    for shard in sorted(set(maps[0].values())):
        names = [n for n, f in maps[0].items() if f == shard]
        handles = {}  # (input, file) → safe_open handle, for this shard only
        result = {}
        for name in names:
            a, b, *c = (_handle(handles, inputs, maps, i, name).get_tensor(name)
                        for i in range(len(inputs)))
            if op == "extract":  # finetuned − base, kept in fp32
                result[name] = a.float() - b.float()
            elif op == "add":  # target + vector, in the target's dtype
                result[name] = (a.float() + b.float()).to(a.dtype)
            elif op == "merge":  # base + (grpo − sft) in one pass, SPEC §5's exact task
                result[name] = (a.float() + (b.float() - c[0].float())).to(a.dtype)
            else:
                raise SystemExit(f"unknown op {op}")
            wmap[name] = shard
            total += result[name].numel() * result[name].element_size()
        save_file(result, str(out / shard), metadata={"format": "pt"})
        result.clear()
        handles.clear()
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": wmap}, indent=2) + "\n")
    if (inputs[0] / "config.json").exists():
        shutil.copy(inputs[0] / "config.json", out / "config.json")


def _handle(handles: dict, inputs: list[Path], maps: list[dict], i: int, name: str):
    from safetensors import safe_open

    key = (i, maps[i][name])
    if key not in handles:
        handles[key] = safe_open(str(inputs[i] / key[1]), framework="pt")
    return handles[key]


def snap(out: Path, dest: Path, names: list[str]) -> None:
    """Copy the spot-check tensors of an output into a small file, so outputs can be deleted."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    wmap = weight_map(out)
    got = {}
    for name in names:
        if name in wmap:
            with safe_open(str(out / wmap[name]), framework="pt") as h:
                got[name] = h.get_tensor(name).contiguous()
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(got, str(dest))


def verify(snapdir: Path) -> dict:
    """Compare snapshots: add-like outputs against plain_add (bf16 ulps), extracts exactly."""
    import torch
    from safetensors.torch import load_file

    def ordered(t: torch.Tensor) -> torch.Tensor:  # bf16 bits → integers monotone in value
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    snaps = {p.stem: load_file(str(p)) for p in snapdir.glob("*.safetensors")}
    report = {}
    pairs = [(r, "plain_add") for r in ADD_LIKE] + [("ours_extract", "plain_extract")]
    for run, ref in pairs:
        if run not in snaps or ref not in snaps:
            continue
        rows = []
        for name, want in snaps[ref].items():
            got = snaps[run].get(name)
            if got is None:
                rows.append({"tensor": name, "ok": False, "why": "missing"})
                continue
            if got.dtype != want.dtype or got.shape != want.shape:
                rows.append({"tensor": name, "ok": False,
                             "why": f"{got.dtype} {tuple(got.shape)} vs {want.dtype} "
                                    f"{tuple(want.shape)}"})
                continue
            if want.dtype == torch.bfloat16:
                ulps = (ordered(got) - ordered(want)).abs()
                rows.append({"tensor": name, "max_ulp": int(ulps.max()),
                             "differ": int((ulps > 0).sum()), "numel": want.numel(),
                             "ok": int(ulps.max()) <= 1})
            else:
                diff = float((got.float() - want.float()).abs().max())
                rows.append({"tensor": name, "max_abs": diff, "ok": diff == 0.0})
        report[f"{run} vs {ref}"] = rows
    return report


# ---------------------------------------------------------------------------------------------
# Driver

def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=False, **kw)


def worker(*args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *map(str, args)]


def ensure_trio(size: str) -> tuple[Path, dict]:
    trio = TRIOS[size]
    dest = CACHE / f"llama-{size}gb"
    recipe = json.dumps({"version": RECIPE_VERSION, "max_shard": MAX_SHARD, **trio},
                        sort_keys=True)
    done = dest / ".done"
    if done.exists() and done.read_text() == recipe:
        return dest, trio
    if dest.exists():
        shutil.rmtree(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    print(f"[build] {size} GB trio → {dest} ...", flush=True)
    t0 = time.perf_counter()
    r = sh(worker("--_build", tmp, json.dumps(trio)))
    if r.returncode:
        raise SystemExit(f"building the {size} GB trio failed")
    done_tmp = tmp / ".done"
    done_tmp.write_text(recipe)
    tmp.rename(dest)
    gb = sum(data_bytes(dest / m) for m in MODELS) / 1e9
    print(f"[build] {size} GB trio: {gb:.2f} GB on disk in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return dest, trio


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list, log: Path) -> dict:
    """Run one subprocess: wall time, its own peak RSS (ru_maxrss, KB on Linux) and CPU time,
    and the CPU time everything else on the machine used meanwhile (interference)."""
    with open(log, "w") as fh:
        busy0 = busy_cpu_seconds()
        t0 = time.perf_counter()
        # `cat` must write to /dev/null, not into the log.
        out = subprocess.DEVNULL if cmd[0] == "cat" else fh
        p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=fh,
                             stdin=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        busy = busy_cpu_seconds() - busy0
    p.returncode = os.waitstatus_to_exitcode(status)
    cpu = ru.ru_utime + ru.ru_stime
    return {"rc": p.returncode, "wall": wall, "rss_mb": ru.ru_maxrss / 1024, "cpu": cpu,
            "other_cpu": max(0.0, busy - cpu)}


def residency(folders: list[Path]) -> float | None:
    """Fraction of the input bytes in the page cache (util-linux fincore), or None."""
    files = [f for d in folders for f in files_of(d)]
    if not shutil.which("fincore") or not files:
        return None
    r = sh(["fincore", "-b", "-n", "-r", "-o", "RES,SIZE", *files], capture_output=True,
           text=True)
    if r.returncode:
        return None
    res = size = 0
    for line in r.stdout.split("\n"):
        if line.strip():
            a, b = line.split()[:2]
            res, size = res + int(a), size + int(b)
    return res / size if size else None


def ours_has(cli: Path, command: str) -> bool:
    return cli.exists() and sh([cli, command, "--help"], capture_output=True).returncode == 0


def mergekit_config(models: dict[str, Path], path: Path) -> Path:
    path.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {models['base']}\n"
        "models:\n"
        f"  - model: {models['grpo']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {models['sft']}\n    parameters: {{weight: -1.0}}\n"
        "parameters: {normalize: false}\n"
        "dtype: float32\n"
        "out_dtype: bfloat16\n")
    return path


def run_size(size: str, args, runs: list[str], notes: list[str]) -> dict:
    root, trio = ensure_trio(size)
    m = {k: root / k for k in MODELS}
    work = CACHE / "runs" / size
    if work.exists():
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    snaps = work / "snaps"
    vec = work / "vec"
    cli = Path(args.mergekit_rl)
    manifest = mergekit_config(m, work / "task_arithmetic.yaml")

    def command(run: str, out: Path) -> tuple[list, list[Path]]:
        """The command line and the input folders it reads."""
        if run == "cat":
            return ["cat", *[f for k in MODELS for f in files_of(m[k])]], list(m.values())
        if run == "startup":
            return [sys.executable, "-c", "import torch, safetensors.torch"], []
        if run == "read":
            return worker("--_plain", "read", "-", *m.values()), list(m.values())
        if run == "plain_extract":
            return worker("--_plain", "extract", out, m["grpo"], m["sft"]), [m["grpo"], m["sft"]]
        if run == "plain_add":
            return worker("--_plain", "add", out, m["base"], vec), [m["base"], vec]
        if run == "plain_merge":
            return (worker("--_plain", "merge", out, m["base"], m["grpo"], m["sft"]),
                    list(m.values()))
        if run == "ours_extract":
            return ([cli, "extract", m["grpo"], m["sft"], "-o", out, "--quiet", "--overwrite"],
                    [m["grpo"], m["sft"]])
        if run == "ours_add":
            return ([cli, "add", m["base"], vec, "-o", out, "--quiet", "--overwrite"],
                    [m["base"], vec])
        if run == "mergekit":
            mk = Path(args.mergekit_python).parent / "mergekit-yaml"
            # No tokenizer in the synthetic models: mergekit's default copy fails after writing.
            return ([mk, manifest, out, "--quiet", "--no-copy-tokenizer",
                     *args.mergekit_args.split()],
                    list(m.values()))
        if run == "ours_merge":
            return ([cli, "merge", manifest, "-o", out, "--quiet", "--overwrite"],
                    list(m.values()))
        raise ValueError(run)

    def once(run: str, out: Path, tag: str) -> dict:
        if out.exists():
            shutil.rmtree(out)
        os.sync()  # no dirty pages from the previous run left to write back during this one
        cmd, inputs = command(run, out)
        r = timed(cmd, work / "logs" / f"{run}.{tag}.log")
        r["bytes"] = sum(data_bytes(d) for d in inputs) + (data_bytes(out) if out.exists() else 0)
        if r["rc"]:
            tail = (work / "logs" / f"{run}.{tag}.log").read_text()[-1500:]
            print(f"  {run} [{tag}] FAILED rc={r['rc']}:\n{tail}", flush=True)
        return r

    # The vector both adds read: ours if ours_add is timed (it may want its own format),
    # else the plain one. Made untimed; doubles as that extract's warm-up.
    sh(["cat", *[f for k in MODELS for f in files_of(m[k])]], stdout=subprocess.DEVNULL)
    failed: set[str] = set()
    warmed: set[str] = set()
    if any(r in runs for r in ("plain_add", "ours_add")):
        maker = "ours_extract" if "ours_add" in runs else "plain_extract"
        r = once(maker, vec, "vec")
        if r["rc"]:
            notes.append(f"{size}: could not make the vector with {maker}; adds skipped")
            failed |= {"plain_add", "ours_add", maker}
        warmed.add(maker)
    runs = [r for r in runs if r not in failed]

    print(f"[{size} GB] warm-up pass: {', '.join(runs)}", flush=True)
    for run in runs:
        if run in warmed:
            continue
        out = work / "out" / run
        if once(run, out, "warmup")["rc"]:
            failed.add(run)
        shutil.rmtree(out, ignore_errors=True)
    runs = [r for r in runs if r not in failed]
    for r in sorted(failed):
        notes.append(f"{size}: {r} failed (see {work / 'logs'}), left out")

    res_before = residency([*m.values(), vec] if vec.exists() else list(m.values()))
    samples = collections.defaultdict(list)
    for rep in range(args.repeats):
        order = runs if rep % 2 == 0 else runs[::-1]
        for run in order:
            out = work / "out" / run
            # Other sessions share these 2 cores: a sample during which the rest of the
            # machine kept more than --noise-limit of a core busy is run again.
            for attempt in range(args.noise_retries + 1):
                r = once(run, out, f"r{rep}")
                # (+0.2 s: kernel writeback and process start-up show up even when idle)
                r["noisy"] = r["other_cpu"] > args.noise_limit * r["wall"] + 0.2
                print(f"  [{size} GB] rep {rep + 1}/{args.repeats} {run:14s} "
                      f"{r['wall']:7.2f} s  {r['rss_mb']:7.0f} MB  cpu {r['cpu']:5.1f} s  "
                      f"others {r['other_cpu']:5.1f} s  rc={r['rc']}"
                      + ("  (noisy)" if r["noisy"] else ""), flush=True)
                if r["rc"] or not r["noisy"]:
                    break
                if attempt < args.noise_retries:
                    samples[run + "/discarded"].append(r)
            samples[run].append(r)
            last = rep == args.repeats - 1
            if last and r["rc"] == 0 and run in (*ADD_LIKE, "plain_add", "ours_extract",
                                                   "plain_extract"):
                sh(worker("--_snap", out, snaps / f"{run}.safetensors",
                          ",".join(spot_names(trio["layers"]))))
            if not (last and args.keep_outputs):
                shutil.rmtree(out, ignore_errors=True)
    res_after = residency([*m.values(), vec] if vec.exists() else list(m.values()))

    check = {}
    if snaps.exists():
        r = sh(worker("--_verify", snaps), capture_output=True, text=True)
        check = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-1000:]}
    if not args.keep_outputs:
        for d in (vec, snaps, work / "out"):
            shutil.rmtree(d, ignore_errors=True)
    rows = []
    for run in runs:
        rs = samples[run]
        ok = [r for r in rs if r["rc"] == 0]
        if not ok:
            continue
        walls = [r["wall"] for r in ok]
        med = statistics.median(walls)
        rows.append({"run": run, "size": size, "n": len(ok), "wall_median": med,
                     "wall_min": min(walls), "wall_max": max(walls),
                     "rss_mb": max(r["rss_mb"] for r in ok),
                     "cpu_median": statistics.median(r["cpu"] for r in ok),
                     "other_cpu_median": statistics.median(r["other_cpu"] for r in ok),
                     "gb_per_s": statistics.median(r["bytes"] for r in ok) / 1e9 / med,
                     "noisy": sum(r["noisy"] for r in ok), "samples": rs,
                     "discarded": samples[run + "/discarded"]})
    return {"rows": rows, "check": check, "residency": [res_before, res_after],
            "trio": trio, "model_gb": data_bytes(m["base"]) / 1e9}


def report(results: dict, notes: list[str], floor_mb: float) -> None:
    print("\n| run | size | wall s median (min–max) | CPU s | others' CPU s | peak RSS MB "
          "| GB/s | noisy kept / retried |")
    print("|---|---|---|---|---|---|---|---|")
    for size, res in results.items():
        for r in res["rows"]:
            gbs = f"{r['gb_per_s']:.2f}" if r["gb_per_s"] else "–"
            print(f"| {r['run']} | {size} | {r['wall_median']:.2f} "
                  f"({r['wall_min']:.2f}–{r['wall_max']:.2f}) | {r['cpu_median']:.1f} | "
                  f"{r['other_cpu_median']:.1f} | {r['rss_mb']:.0f} | {gbs} | "
                  f"{r['noisy']} / {len(r['discarded'])} |")

    def row(size, run):
        for r in results.get(size, {}).get("rows", []):
            if r["run"] == run:
                return r
        return None

    print("\n| check | value | target |")
    print("|---|---|---|")
    for size in results:
        for ours, ref, target in (("ours_add", "plain_add", 0.35),
                                  ("ours_extract", "plain_extract", None),
                                  ("ours_merge", "plain_merge", None),
                                  ("ours_merge", "mergekit", None)):
            a, b = row(size, ours), row(size, ref)
            if a and b:
                ratio = a["wall_median"] / b["wall_median"]
                verdict = ("" if target is None else
                           f"≤ {target}× {'PASS' if ratio <= target else 'FAIL'}")
                print(f"| {size} GB wall {ours} / {ref} | {ratio:.2f}× | {verdict} |")
    for run in ("ours_add", "ours_extract", "ours_merge"):
        big, small = row("1.9", run), row("0.5", run)
        if big:
            ok = big["rss_mb"] <= 800
            print(f"| 1.9 GB peak RSS {run} | {big['rss_mb']:.0f} MB | ≤ 800 MB "
                  f"{'PASS' if ok else 'FAIL'} |")
        if big and small:
            g = big["rss_mb"] / small["rss_mb"]
            print(f"| peak RSS {run} 1.9 GB / 0.5 GB | {g:.2f}× | ≤ 1.15× "
                  f"{'PASS' if g <= 1.15 else 'FAIL'} |")

    print(f"\nRSS floor: this driver's own peak RSS is {floor_mb:.0f} MB (a child's ru_maxrss "
          "cannot be below it)")
    for size, res in results.items():
        rb, ra = res["residency"]
        if rb is not None:
            print(f"{size} GB: inputs in page cache {rb:.0%} before timing, {ra:.0%} after")
        for pair, rows in res["check"].items():
            if pair == "error":
                print(f"{size} GB: verification failed to run: {rows}")
                continue
            ok = all(r["ok"] for r in rows)
            detail = "; ".join(
                f"{r['tensor']}: " + (r.get("why") or (f"max {r['max_ulp']} ulp, "
                                                      f"{r['differ']}/{r['numel']} differ"
                                                      if "max_ulp" in r else
                                                      f"max |Δ| {r['max_abs']:g}"))
                for r in rows)
            print(f"{size} GB check {pair}: {'OK' if ok else 'MISMATCH'} ({detail})")
    for n in notes:
        print("note:", n)


# ---- toolkit rows (issue 16): `extract --rank 64` and `compare` ---------------------------------
# Kept apart from the timing core above so that both can change independently; run them with
# `--toolkit`. Each run is a subprocess timed by `timed` (wall, its own peak RSS).

TOOLKIT_RUNS = ("read2", "ours_compare", "ours_extract_r64")


def toolkit_size(size: str, args) -> dict:
    """Time reading grpo+sft once, `compare grpo sft` and `extract grpo sft --rank 64`."""
    root, trio = ensure_trio(size)
    m = {k: root / k for k in MODELS}
    work = CACHE / "runs" / f"toolkit-{size}"
    if work.exists():
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    cli = Path(args.mergekit_rl)
    commands = {
        "read2": worker("--_plain", "read", "-", m["grpo"], m["sft"]),
        "ours_compare": [cli, "compare", m["grpo"], m["sft"], "--json"],
        "ours_extract_r64": [cli, "extract", m["grpo"], m["sft"], "-o", work / "lowrank",
                             "--rank", "64", "--quiet", "--overwrite"],
    }
    sh(["cat", *[f for k in ("grpo", "sft") for f in files_of(m[k])]], stdout=subprocess.DEVNULL)
    samples = collections.defaultdict(list)
    sizes = {}
    wanted = [r.strip() for r in (args.only or "").split(",") if r.strip()]
    runs = [r for r in TOOLKIT_RUNS if not wanted or r in wanted]
    for rep in range(args.repeats):
        for run in (runs if rep % 2 == 0 else runs[::-1]):
            os.sync()
            r = timed(commands[run], work / "logs" / f"{run}.r{rep}.log")
            print(f"  [{size} GB] rep {rep + 1}/{args.repeats} {run:17s} {r['wall']:7.2f} s  "
                  f"{r['rss_mb']:7.0f} MB  cpu {r['cpu']:5.1f} s  others {r['other_cpu']:5.1f} s"
                  f"  rc={r['rc']}", flush=True)
            if r["rc"]:
                print((work / "logs" / f"{run}.r{rep}.log").read_text()[-1500:], flush=True)
            samples[run].append(r)
            if run == "ours_extract_r64" and r["rc"] == 0:
                lowrank = json.loads((work / "lowrank" / "provenance.json").read_text())["lowrank"]
                sizes = {"lowrank_bytes": lowrank["bytes"], "dense_bytes": lowrank["dense_bytes"],
                         "ratio": lowrank["ratio"]}
                shutil.rmtree(work / "lowrank", ignore_errors=True)
    rows = []
    for run in runs:
        ok = [r for r in samples[run] if r["rc"] == 0]
        if ok:
            walls = [r["wall"] for r in ok]
            rows.append({"run": run, "size": size, "n": len(ok),
                         "wall_median": statistics.median(walls), "wall_min": min(walls),
                         "wall_max": max(walls), "rss_mb": max(r["rss_mb"] for r in ok),
                         "other_cpu_median": statistics.median(r["other_cpu"] for r in ok),
                         "samples": samples[run]})
    return {"rows": rows, "sizes": sizes, "model_gb": data_bytes(m["base"]) / 1e9}


def toolkit_report(results: dict) -> None:
    print("\n| run | size | wall s median (min–max) | others' CPU s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for size, res in results.items():
        for r in res["rows"]:
            print(f"| {r['run']} | {size} | {r['wall_median']:.2f} ({r['wall_min']:.2f}–"
                  f"{r['wall_max']:.2f}) | {r['other_cpu_median']:.1f} | {r['rss_mb']:.0f} |")

    def row(size, run):
        return next((r for r in results.get(size, {}).get("rows", []) if r["run"] == run), None)

    print("\n| check | value | target |")
    print("|---|---|---|")
    for size in results:
        a, b = row(size, "ours_compare"), row(size, "read2")
        if a and b:
            ratio = a["wall_median"] / b["wall_median"]
            print(f"| {size} GB compare / read both once | {ratio:.2f}× | ≤ 1.2× "
                  f"{'PASS' if ratio <= 1.2 else 'FAIL'} |")
        sz = results[size]["sizes"]
        if sz:
            print(f"| {size} GB rank-64 vector / dense vector | {sz['lowrank_bytes'] / 1e6:.0f} MB"
                  f" / {sz['dense_bytes'] / 1e6:.0f} MB = {sz['ratio']:.1%} | – |")
    for run in ("ours_compare", "ours_extract_r64"):
        big, small = row("1.9", run), row("0.5", run)
        if big:
            print(f"| 1.9 GB peak RSS {run} | {big['rss_mb']:.0f} MB | ≤ 800 MB "
                  f"{'PASS' if big['rss_mb'] <= 800 else 'FAIL'} |")
        if big and small:
            g = big["rss_mb"] / small["rss_mb"]
            print(f"| peak RSS {run} 1.9 GB / 0.5 GB | {g:.2f}× | ≤ 1.15× "
                  f"{'PASS' if g <= 1.15 else 'FAIL'} |")


# ---- end of the toolkit rows -------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("1.9", "0.5", "both"), default="both")
    ap.add_argument("--only", help="comma-separated runs: " + ",".join(ALL_RUNS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--noise-limit", type=float, default=0.25,
                    help="a sample is noisy when other processes used more than this many "
                         "cores on average (+0.2 s) while it ran (default 0.25)")
    ap.add_argument("--noise-retries", type=int, default=2,
                    help="run a noisy sample again up to this many times (default 2)")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep the last repeat's outputs and the vector (needs ~13 GB more)")
    ap.add_argument("--json", type=Path, help="write every sample and check here")
    ap.add_argument("--mergekit-python", help="python of a side venv with mergekit installed")
    ap.add_argument("--mergekit-args", default="",
                    help="extra mergekit-yaml flags, e.g. '--out-shard-size 500M'")
    ap.add_argument("--mergekit-rl", default=str(Path(sys.executable).parent / "mergekit-rl"),
                    help="the mergekit-rl executable to time (default: next to this python)")
    ap.add_argument("--build-only", action="store_true", help="build the cache and stop")
    ap.add_argument("--toolkit", action="store_true",
                    help="time only the toolkit rows: " + ", ".join(TOOLKIT_RUNS))
    # Internal: the subprocess entry points.
    ap.add_argument("--_build", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_plain", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--_snap", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_verify", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._build:
        return build_trio(Path(args._build[0]), json.loads(args._build[1]))
    if args._plain:
        op, out, *inputs = args._plain
        return plain(op, None if out == "-" else Path(out), [Path(p) for p in inputs])
    if args._snap:
        return snap(Path(args._snap[0]), Path(args._snap[1]), args._snap[2].split(","))
    if args._verify:
        print(json.dumps(verify(Path(args._verify))))
        return

    sizes = ["0.5", "1.9"] if args.size == "both" else [args.size]
    if args.build_only:
        for s in sizes:
            ensure_trio(s)
        return
    if args.toolkit:  # --only then picks among TOOLKIT_RUNS
        results = {s: toolkit_size(s, args) for s in sizes}
        toolkit_report(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        return
    notes: list[str] = []
    if args.only:
        runs = [r.strip() for r in args.only.split(",") if r.strip()]
        bad = [r for r in runs if r not in ALL_RUNS]
        if bad:
            ap.error(f"--only: unknown run(s) {bad}; choose from {', '.join(ALL_RUNS)}")
    else:
        runs = [r for r in ALL_RUNS if args.mergekit_python or r != "mergekit"]
    if "mergekit" in runs and not args.mergekit_python:
        notes.append("mergekit skipped: give --mergekit-python")
        runs.remove("mergekit")
    cli = Path(args.mergekit_rl)
    for run, sub in (("ours_extract", "extract"), ("ours_add", "add"), ("ours_merge", "merge")):
        if run in runs and not ours_has(cli, sub):
            notes.append(f"{run} skipped: `{cli} {sub} --help` does not succeed yet")
            runs.remove(run)
    if "ours_add" in runs and "ours_extract" not in runs and not ours_has(cli, "extract"):
        runs.remove("ours_add")

    results = {}
    for s in sizes:
        results[s] = run_size(s, args, runs, notes)
    floor_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report(results, notes, floor_mb)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "notes": notes,
                                         "driver_rss_mb": floor_mb, "runs": runs,
                                         "repeats": args.repeats}, indent=1) + "\n")


if __name__ == "__main__":
    main()
