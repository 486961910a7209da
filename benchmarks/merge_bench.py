"""Time `mergekit-rl extract` / `add` / `merge` as multiples of this machine's floor.

The floor of a command is what no implementation can avoid: starting Python with torch
(`python -c "import torch"`) plus writing the bytes it outputs (`dd` of that many bytes into a
new file on the same disk). Each repeat measures the floor next to the command (floor first on
even repeats, command first on odd ones), and the table gives the median and the spread of the
per-repeat ratios, so the 2x drift between runs and machines cancels. Inputs are the synthetic
Llama trios of SPEC §5 (built once under benchmarks/_cache/), read from a warm page cache.

    .venv/bin/python benchmarks/merge_bench.py                    # both trios, 5 repeats
    .venv/bin/python benchmarks/merge_bench.py --size 1.9 --only ours_add --repeats 9
    .venv/bin/python benchmarks/merge_bench.py --mergekit-python /tmp/mkvenv/bin/python
    .venv/bin/python benchmarks/merge_bench.py --only plain_add,ours_add   # the plain loop too

Correctness: the plain safetensors loop (`--_plain`) makes each output once, untimed, and every
tensor of ours must equal it bit for bit (sha256 of each tensor's bytes); mergekit's output is
compared on three tensors in bf16 ulps. Every timed run is its own subprocess; its peak RSS is
that child's `ru_maxrss` from `os.wait4`. This driver never imports torch: on Linux a child's
ru_maxrss starts from the RSS of the process it was forked from, so the heavy work (building,
the plain loop, digests) runs in subprocesses of this same file (`--_build`, `--_plain`, ...).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
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

OURS = ("ours_extract", "ours_add", "ours_merge")
PLAIN = {"ours_extract": "plain_extract", "ours_add": "plain_add", "ours_merge": "plain_merge",
         "mergekit": "plain_merge"}
ALL_RUNS = (*OURS, "mergekit", "plain_extract", "plain_add", "plain_merge", "read")
# Goals of issue 17: wall time as a multiple of the floor, on the 1.9 GB trio.
GOALS = {"ours_add": 1.25, "ours_extract": 1.25, "ours_merge": 1.4}
RSS_LIMIT_MB, RSS_GROWTH = 800, 1.15


# Three tensors for mergekit's ulp check: start of the first shard, a big MLP matrix in the
# last layer, and the last tensor written.
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


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every tensor's bytes (and its dtype and shape), header metadata ignored."""
    import hashlib

    out = {}
    for f in files_of(folder):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                b, e = meta["data_offsets"]
                fh.seek(8 + n + b)
                h = hashlib.sha256(fh.read(e - b)).hexdigest()
                out[name] = f"{meta['dtype']}{meta['shape']}:{h}"
    return out


def ulps(a: Path, b: Path, names: list[str]) -> list[dict]:
    """Largest bf16 ulp distance of a few tensors of two outputs (mergekit vs the plain loop)."""
    import torch
    from safetensors import safe_open

    def ordered(t):  # bf16 bits → integers monotone in value
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    rows = []
    for name in names:
        got = []
        for folder in (a, b):
            file = folder / weight_map(folder)[name]
            with safe_open(str(file), framework="pt") as h:
                got.append(h.get_tensor(name))
        d = (ordered(got[0]) - ordered(got[1])).abs()
        rows.append({"tensor": name, "max_ulp": int(d.max()), "differ": int((d > 0).sum()),
                     "numel": d.numel()})
    return rows


def fingerprint_seconds(folders: list[Path]) -> float:
    """In-process time of the default provenance fingerprints of these checkpoints."""
    from mergekit_rl.checkpoint import Checkpoint

    t0 = time.perf_counter()
    for folder in folders:
        with Checkpoint.open(folder) as ckpt:
            ckpt.fingerprints()
    return time.perf_counter() - t0


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
    if sh(worker("--_build", tmp, json.dumps(trio))).returncode:
        raise SystemExit(f"building the {size} GB trio failed")
    (tmp / ".done").write_text(recipe)
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
        p = subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=fh,
                             stdin=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        busy = busy_cpu_seconds() - busy0
    cpu = ru.ru_utime + ru.ru_stime
    return {"rc": os.waitstatus_to_exitcode(status), "wall": wall, "rss_mb": ru.ru_maxrss / 1024,
            "cpu": cpu, "other_cpu": max(0.0, busy - cpu)}


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


ENGINE_LINE = re.compile(r"at ([\d.]+) GB/s \(busy: ([^)]*)\)")


def run_size(size: str, args, runs: list[str], notes: list[str]) -> dict:
    root, trio = ensure_trio(size)
    m = {k: root / k for k in MODELS}
    work = CACHE / "runs" / size
    if work.exists():
        shutil.rmtree(work)
    for sub in ("logs", "out", "ref"):
        (work / sub).mkdir(parents=True)
    vec = work / "vec"
    cli = Path(args.mergekit_rl)
    manifest = mergekit_config(m, work / "task_arithmetic.yaml")
    threads = ["--threads", str(args.threads)] if args.threads else []

    def command(run: str, out: Path) -> tuple[list, list[Path]]:
        """The command line and the input folders it reads."""
        if run == "read":
            return worker("--_plain", "read", "-", *m.values()), list(m.values())
        if run.startswith("plain_"):
            ins = {"extract": [m["grpo"], m["sft"]], "add": [m["base"], vec],
                   "merge": [m["base"], m["grpo"], m["sft"]]}[run[6:]]
            return worker("--_plain", run[6:], out, *ins), ins
        if run == "mergekit":
            mk = Path(args.mergekit_python).parent / "mergekit-yaml"
            # No tokenizer in the synthetic models: mergekit's default copy fails after writing.
            return ([mk, manifest, out, "--quiet", "--no-copy-tokenizer",
                     *args.mergekit_args.split()], list(m.values()))
        # Not --quiet: the summary line (throughput, busy share per stage) goes to the log.
        if run == "ours_extract":
            return ([cli, "extract", m["grpo"], m["sft"], "-o", out, "--overwrite", *threads],
                    [m["grpo"], m["sft"]])
        if run == "ours_add":
            return ([cli, "add", m["base"], vec, "-o", out, "--overwrite", *threads],
                    [m["base"], vec])
        if run == "ours_merge":
            return [cli, "merge", manifest, "-o", out, "--overwrite", *threads], list(m.values())
        raise ValueError(run)

    def once(run: str, out: Path, tag: str) -> dict:
        if out.exists():
            shutil.rmtree(out)
        os.sync()  # no dirty pages from the previous run left to write back during this one
        cmd, inputs = command(run, out)
        log = work / "logs" / f"{run}.{tag}.log"
        r = timed(cmd, log)
        r["bytes_out"] = data_bytes(out) if out.exists() else 0
        r["bytes"] = sum(data_bytes(d) for d in inputs) + r["bytes_out"]
        if r["rc"]:
            print(f"  {run} [{tag}] FAILED rc={r['rc']}:\n{log.read_text()[-1500:]}", flush=True)
        found = ENGINE_LINE.findall(log.read_text(errors="replace"))
        if found:
            r["engine"] = f"{found[-1][0]} GB/s; {found[-1][1]}"
        return r

    def floor(nbytes: int, tag: str) -> dict:
        """`python -c "import torch"`, then `dd` of nbytes into a new file: two processes."""
        sink = work / "floor.bin"
        sink.unlink(missing_ok=True)
        os.sync()
        a = timed([sys.executable, "-c", "import torch"], work / "logs" / f"floor.{tag}.log")
        b = timed(["dd", "if=/dev/zero", f"of={sink}", "bs=4M", f"count={nbytes}",
                   "iflag=count_bytes"], work / "logs" / f"dd.{tag}.log")
        sink.unlink(missing_ok=True)
        return {"rc": a["rc"] or b["rc"], "import": a["wall"], "dd": b["wall"],
                "wall": a["wall"] + b["wall"], "other_cpu": a["other_cpu"] + b["other_cpu"],
                "rss_mb": a["rss_mb"]}

    # Warm the page cache; make the vector both adds read (untimed, with ours).
    sh(["cat", *[f for k in MODELS for f in files_of(m[k])]], stdout=subprocess.DEVNULL)
    failed: set[str] = set()
    if any(r in runs for r in ("ours_add", "plain_add")) or args.check:
        if once("ours_extract", vec, "vec")["rc"]:
            raise SystemExit(f"{size}: could not make the vector with ours_extract")

    # Correctness: the plain loop's output once per command, compared tensor by tensor.
    check: dict[str, dict] = {}
    refs = {}
    if args.check:
        print(f"[{size} GB] correctness references (plain loop, untimed)", flush=True)
        for run in sorted({PLAIN[r] for r in runs if r in PLAIN}):
            out = work / "ref" / run
            if once(run, out, "ref")["rc"]:
                notes.append(f"{size}: the reference {run} failed; no check against it")
                continue
            refs[run] = out

    print(f"[{size} GB] warm-up pass: {', '.join(runs)}", flush=True)
    written = {}
    for run in runs:
        out = work / "out" / run
        r = once(run, out, "warmup")
        if r["rc"]:
            failed.add(run)
        written[run] = r["bytes_out"]
        if run in PLAIN and PLAIN[run] in refs and not r["rc"]:
            check[run] = compare(out, refs[PLAIN[run]], run == "mergekit", trio)
        shutil.rmtree(out, ignore_errors=True)
    runs = [r for r in runs if r not in failed]
    for r in sorted(failed):
        notes.append(f"{size}: {r} failed (see {work / 'logs'}), left out")
    for d in refs.values():
        shutil.rmtree(d, ignore_errors=True)

    res_before = residency([*m.values(), vec] if vec.exists() else list(m.values()))
    samples = collections.defaultdict(list)
    for rep in range(args.repeats):
        order = runs if rep % 2 == 0 else runs[::-1]
        for run in order:
            out = work / "out" / run
            # Other sessions share these cores: a pair during which the rest of the machine
            # kept more than --noise-limit of a core busy is run again.
            for attempt in range(args.noise_retries + 1):
                pair = [("floor", None), ("cmd", None)]
                if rep % 2:
                    pair.reverse()
                got = {}
                for kind, _ in pair:
                    got[kind] = (floor(written[run], f"{run}.r{rep}") if kind == "floor"
                                 else once(run, out, f"r{rep}"))
                    shutil.rmtree(out, ignore_errors=True)
                r, f = got["cmd"], got["floor"]
                r["floor"], r["floor_import"], r["floor_dd"] = f["wall"], f["import"], f["dd"]
                r["ratio"] = r["wall"] / f["wall"]
                busy_others = r["other_cpu"] + f["other_cpu"]
                # (+0.2 s: kernel writeback and process start-up show up even when idle)
                r["noisy"] = busy_others > args.noise_limit * (r["wall"] + f["wall"]) + 0.2
                print(f"  [{size} GB] rep {rep + 1}/{args.repeats} {run:13s} {r['wall']:6.2f} s"
                      f"  floor {f['wall']:5.2f} s (import {f['import']:.2f} + dd "
                      f"{f['dd']:.2f})  ratio {r['ratio']:5.2f}  {r['rss_mb']:5.0f} MB  "
                      f"others {busy_others:4.1f} s" + ("  (noisy)" if r["noisy"] else ""),
                      flush=True)
                if r["rc"] or f["rc"] or not r["noisy"]:
                    break
                if attempt < args.noise_retries:
                    samples[run + "/discarded"].append(r)
            samples[run].append(r)
    res_after = residency([*m.values(), vec] if vec.exists() else list(m.values()))
    fp = sh(worker("--_fingerprint", *m.values()), capture_output=True, text=True)
    if not args.keep_outputs:
        for d in (vec, work / "out", work / "ref"):
            shutil.rmtree(d, ignore_errors=True)

    rows = []
    for run in runs:
        ok = [r for r in samples[run] if r["rc"] == 0]
        if not ok:
            continue
        ratios = [r["ratio"] for r in ok]
        walls = [r["wall"] for r in ok]
        rows.append({"run": run, "size": size, "n": len(ok),
                     "wall_median": statistics.median(walls), "wall_min": min(walls),
                     "wall_max": max(walls),
                     "floor_median": statistics.median(r["floor"] for r in ok),
                     "import_median": statistics.median(r["floor_import"] for r in ok),
                     "dd_median": statistics.median(r["floor_dd"] for r in ok),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios), "rss_mb": max(r["rss_mb"] for r in ok),
                     "bytes_out": written[run], "engine": ok[-1].get("engine", ""),
                     "noisy": sum(r["noisy"] for r in ok),
                     "discarded": len(samples[run + "/discarded"]), "samples": samples[run]})
    return {"rows": rows, "check": check, "residency": [res_before, res_after], "trio": trio,
            "model_gb": data_bytes(m["base"]) / 1e9,
            "fingerprint_s": float(fp.stdout) if fp.returncode == 0 else None}


def compare(out: Path, ref: Path, approximate: bool, trio: dict) -> dict:
    """Ours: every tensor bit for bit. mergekit (its own op order): three tensors in ulps."""
    if approximate:
        r = sh(worker("--_ulps", out, ref, ",".join(spot_names(trio["layers"]))),
               capture_output=True, text=True)
        if r.returncode:
            return {"ok": False, "detail": r.stderr[-500:]}
        rows = json.loads(r.stdout)
        return {"ok": all(x["max_ulp"] <= 1 for x in rows),
                "detail": "; ".join(f"{x['tensor']}: max {x['max_ulp']} ulp, "
                                    f"{x['differ']}/{x['numel']} differ" for x in rows)}
    a, b = (sh(worker("--_digest", d), capture_output=True, text=True) for d in (out, ref))
    if a.returncode or b.returncode:
        return {"ok": False, "detail": (a.stderr + b.stderr)[-500:]}
    da, db = json.loads(a.stdout), json.loads(b.stdout)
    differ = sorted(k for k in db if da.get(k) != db[k]) + sorted(set(da) - set(db))
    return {"ok": not differ, "detail": f"{len(db) - len(differ)}/{len(db)} tensors "
            "bit-identical" + (f"; differ: {differ[:3]}" if differ else "")}


def report(results: dict, notes: list[str], floor_mb: float) -> None:
    label = {"ours_extract": "`mergekit-rl extract`", "ours_add": "`mergekit-rl add`",
             "ours_merge": "`mergekit-rl merge` (one pass)", "mergekit": "mergekit 0.1.5",
             "plain_extract": "plain loop extract", "plain_add": "plain loop add",
             "plain_merge": "plain loop merge", "read": "read every tensor (safe_open)"}
    print("\n| command | trio | wall s median (min–max) | floor s: import + dd (GB) "
          "| × floor median (min–max) | goal | peak RSS MB | engine (last repeat) |")
    print("|---|---|---|---|---|---|---|---|")
    for size, res in results.items():
        for r in res["rows"]:
            goal = GOALS.get(r["run"]) if size == "1.9" else None
            verdict = (f"≤ {goal}× {'met' if r['ratio_median'] <= goal else 'NOT met'}"
                       if goal else "")
            print(f"| {label[r['run']]} | {size} GB | {r['wall_median']:.2f} "
                  f"({r['wall_min']:.2f}–{r['wall_max']:.2f}) | {r['floor_median']:.2f}: "
                  f"{r['import_median']:.2f} + {r['dd_median']:.2f} ({r['bytes_out'] / 1e9:.2f})"
                  f" | **{r['ratio_median']:.2f}×** ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"
                  f" | {verdict} | {r['rss_mb']:.0f} | {r['engine']} |")

    def row(size, run):
        return next((r for r in results.get(size, {}).get("rows", []) if r["run"] == run), None)

    print("\n| check | value | goal |")
    print("|---|---|---|")
    for run in OURS:
        big, small = row("1.9", run), row("0.5", run)
        if big:
            print(f"| peak RSS {run}, 1.9 GB trio | {big['rss_mb']:.0f} MB | ≤ {RSS_LIMIT_MB} MB "
                  f"{'met' if big['rss_mb'] <= RSS_LIMIT_MB else 'NOT met'} |")
        if big and small:
            g = big["rss_mb"] / small["rss_mb"]
            print(f"| peak RSS {run}, 1.9 GB / 0.5 GB | {g:.2f}× | ≤ {RSS_GROWTH}× "
                  f"{'met' if g <= RSS_GROWTH else 'NOT met'} |")
    mk, ours = row("1.9", "mergekit"), row("1.9", "ours_merge")
    if mk and ours:
        ratio = ours["wall_median"] / mk["wall_median"]
        print(f"| 1.9 GB merge: ours / mergekit wall | {ratio:.2f}× | |")
    for size, res in results.items():
        for run, c in res["check"].items():
            print(f"| {size} GB {run} vs the plain loop | {c['detail']} | "
                  f"{'≤ 1 ulp' if run == 'mergekit' else 'bit-identical'} "
                  f"{'met' if c['ok'] else 'NOT met'} |")
        if res["fingerprint_s"] is not None:
            print(f"| {size} GB default fingerprints of the 3 inputs (in-process) | "
                  f"{res['fingerprint_s'] * 1000:.0f} ms | |")
    print(f"\nRSS floor: this driver's own peak RSS is {floor_mb:.0f} MB (a child's ru_maxrss "
          "cannot be below it)")
    for size, res in results.items():
        rb, ra = res["residency"]
        if rb is not None:
            print(f"{size} GB: inputs in page cache {rb:.0%} before timing, {ra:.0%} after")
        noisy = sum(r["noisy"] for r in res["rows"])
        retried = sum(r["discarded"] for r in res["rows"])
        print(f"{size} GB: {noisy} noisy samples kept, {retried} retried")
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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, help="pass --threads N to mergekit-rl")
    ap.add_argument("--noise-limit", type=float, default=0.25,
                    help="a pair (floor + command) is noisy when other processes used more than "
                         "this many cores on average (+0.2 s) while it ran (default 0.25)")
    ap.add_argument("--noise-retries", type=int, default=2,
                    help="run a noisy pair again up to this many times (default 2)")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the comparison with the plain loop's outputs")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the vector")
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
    ap.add_argument("--_digest", help=argparse.SUPPRESS)
    ap.add_argument("--_ulps", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_fingerprint", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._build:
        return build_trio(Path(args._build[0]), json.loads(args._build[1]))
    if args._plain:
        op, out, *inputs = args._plain
        return plain(op, None if out == "-" else Path(out), [Path(p) for p in inputs])
    if args._digest:
        return print(json.dumps(digest(Path(args._digest))))
    if args._ulps:
        return print(json.dumps(ulps(Path(args._ulps[0]), Path(args._ulps[1]),
                                     args._ulps[2].split(","))))
    if args._fingerprint:
        return print(fingerprint_seconds([Path(p) for p in args._fingerprint]))

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
        runs = [*OURS, "mergekit"]
    if "mergekit" in runs and not args.mergekit_python:
        notes.append("mergekit skipped: give --mergekit-python")
        runs.remove("mergekit")
    if not Path(args.mergekit_rl).exists():
        ap.error(f"--mergekit-rl {args.mergekit_rl}: not found")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    results = {s: run_size(s, args, runs, notes) for s in sizes}
    floor_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report(results, notes, floor_mb)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "notes": notes,
                                         "driver_rss_mb": floor_mb, "runs": runs,
                                         "repeats": args.repeats}, indent=1) + "\n")


if __name__ == "__main__":
    main()
