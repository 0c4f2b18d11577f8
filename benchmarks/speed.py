"""Speed and memory of `compare` against the read floor and the usual approaches, measured in one run.

    python benchmarks/speed.py [--dir DIR] [--size 1b] [--repeats 3]

Builds (once, cached in DIR) a synthetic bf16 pair with the package's factory: a random-init Llama-style base and
a derived model (base + Gaussian noise of 0.5x each tensor's std). Then, each as a separate process (peak RSS from
the child's VmHWM, which counts every page it touched, mmap included), interleaved over `repeats` rounds, median
wall time:

  cold read      both checkpoints, page cache evicted with posix_fadvise(DONTNEED), read with 16 MiB preads
  parallel read  the same, both checkpoints at once (a thread each) with 64 MiB announced ahead
                 (posix_fadvise WILLNEED): a stricter floor, reported beside the cold read
  warm read      the same without eviction (`dd bs=16M of=/dev/null` equivalent)
  minimal loop   safetensors get_tensor + torch cosine per tensor (cold)
  usual approach transformers from_pretrained of both models, then a state-dict cosine loop (cold)
  full compare   hf_provenance.compare.compare (cold)
  sampled        the same with sample=0.1 (cold)

Prints a Markdown table and the target ratios; writes DIR/speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    "100m": dict(hidden=768, layers=8, intermediate=3072, vocab=32000),
    "300m": dict(hidden=1024, layers=16, intermediate=4096, vocab=32000),
    "1b": dict(hidden=2048, layers=16, intermediate=8192, vocab=32000),
    "3b": dict(hidden=3072, layers=24, intermediate=8192, vocab=32000),
    # Llama-2-7B's shape (full multi-head attention: the k/v projections are as big as q/o and are sampled too):
    # 6.7B parameters a side, 27 GB for the pair
    "7b": dict(hidden=4096, layers=32, intermediate=11008, vocab=32000, heads=32, kv_heads=32),
    # a fine-grained MoE (Qwen3-30B-A3B's layer: 128 experts of 768 units), two layers: 1.36B parameters
    "moe1b": dict(family="qwen3_moe", hidden=2048, layers=2, intermediate=6144, vocab=32000, experts=128,
                  moe_intermediate=768, experts_per_tok=8),
    "moe3b": dict(family="qwen3_moe", hidden=2048, layers=4, intermediate=6144, vocab=32000, experts=128,
                  moe_intermediate=768, experts_per_tok=8),
    # eight layers (5B parameters, 20 GB for the pair): where a whole sampled process, with its ~1 s of interpreter
    # and torch import, is also 5x faster than a full one
    "moe5b": dict(family="qwen3_moe", hidden=2048, layers=8, intermediate=6144, vocab=32000, experts=128,
                  moe_intermediate=768, experts_per_tok=8),
}

WORKLOADS = {
    "cold_read": "read", "parallel_read": "read2", "warm_read": "read", "minimal_loop": "minimal", "usual_approach": "usual",
    "compare_full": "compare", "compare_sampled": "compare",
}


def build_pair(root: Path, size: str) -> tuple[Path, Path]:
    from hf_provenance.factory import apply_transform, build_random

    base, model = root / f"{size}-base", root / f"{size}-noisy"
    if not (base / "config.json").exists():
        spec = dict(SIZES[size])
        build_random(spec.pop("family", "llama"), base, seed=0, dtype="bfloat16", **spec)
    if not (model / "config.json").exists():
        apply_transform(base, model, "noise", scale=0.5)
    return base, model


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def evict(folders) -> None:
    for folder in folders:
        for f in weight_files(Path(folder)):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---- workloads (run in a child process) --------------------------------------------------------------------------

def w_read(folders) -> dict:
    buf = bytearray(16 << 20)
    total = 0
    for folder in folders:
        for f in weight_files(Path(folder)):
            fd = os.open(f, os.O_RDONLY)
            try:
                while True:
                    n = os.readv(fd, [buf])
                    if n <= 0:
                        break
                    total += n
            finally:
                os.close(fd)
    return {"bytes": total}


def w_read_parallel(folders) -> dict:
    """Each checkpoint on its own thread, 16 MiB preads, the next 64 MiB announced to the kernel: as fast as this
    machine reads two files (the compare reads both sides at once)."""
    import threading

    totals = []

    def one(folder):
        buf, total, ahead = bytearray(16 << 20), 0, 64 << 20
        for f in weight_files(Path(folder)):
            fd = os.open(f, os.O_RDONLY)
            try:
                size, off, hinted = os.fstat(fd).st_size, 0, 0
                while off < size:
                    while hinted < min(size, off + ahead):
                        os.posix_fadvise(fd, hinted, 16 << 20, os.POSIX_FADV_WILLNEED)
                        hinted += 16 << 20
                    n = os.preadv(fd, [buf], off)
                    if n <= 0:
                        break
                    off += n
                    total += n
            finally:
                os.close(fd)
        totals.append(total)

    threads = [threading.Thread(target=one, args=(f,)) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"bytes": sum(totals)}


def w_minimal(folders) -> dict:
    import torch
    from safetensors import safe_open

    base, model = folders
    handles = {}
    where = {}
    for f in weight_files(Path(model)):
        handles[f] = safe_open(str(f), "pt")
        where.update({k: handles[f] for k in handles[f].keys()})
    vals = []
    for fb in weight_files(Path(base)):
        with safe_open(str(fb), "pt") as a:
            for k in a.keys():
                x, y = a.get_tensor(k).float().reshape(-1), where[k].get_tensor(k).float().reshape(-1)
                vals.append(float(torch.nn.functional.cosine_similarity(x, y, dim=0)))
    return {"tensors": len(vals)}


def w_usual(folders) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    base, model = folders
    a = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    b = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    sb = b.state_dict()
    vals = [float(torch.nn.functional.cosine_similarity(v.float().reshape(-1), sb[k].float().reshape(-1), dim=0))
            for k, v in a.state_dict().items()]
    return {"tensors": len(vals)}


def w_compare(folders, sample=None) -> dict:
    """``hf-provenance compare`` as a user runs it (the console script's ``main``, JSON report, terminal summary
    discarded); the command's own imports are timed apart from the comparison."""
    import contextlib
    import tempfile

    from hf_provenance.cli import commands
    from hf_provenance.cli.main import _preload, main

    base, model = folders
    t0 = time.perf_counter()
    _preload(next(c.preload for c in commands.COMMANDS if c.name == "compare"), freeze=True)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["compare", str(model), "--base", str(base), "--json", f"{tmp}/report.json"]
        argv += ["--sample", str(sample)] if sample else []
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            code = main(argv, process=True)
        t2 = time.perf_counter()
        if code != 0:
            raise SystemExit(f"compare exited with {code}")
        d = json.loads(Path(f"{tmp}/report.json").read_text())["comparisons"][0]
    return {"verdict": d["verdict"], "bytes_read": d["io"]["bytes_read"], "fraction_read": d["io"]["fraction_read"],
            "import_s": t1 - t0, "call_s": t2 - t1}


def child(name: str, folders: list[str]) -> None:
    kind = WORKLOADS[name]
    if kind == "read":
        out = w_read(folders)
    elif kind == "read2":
        out = w_read_parallel(folders)
    elif kind == "minimal":
        out = w_minimal(folders)
    elif kind == "usual":
        out = w_usual(folders)
    else:
        out = w_compare(folders, 0.1 if name == "compare_sampled" else None)
    # VmHWM: this process's peak resident set since exec (every touched page, mmap included). wait4's ru_maxrss
    # would also count the parent's pages at fork time.
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    out["peak_rss_mib"] = hwm / 1024
    print(json.dumps(out))
    # every workload ends as the console script does (``cli.main.exit_now``): no interpreter teardown, which
    # would charge the workloads that imported torch 0.07-0.1 s for freeing what a finished process leaves behind
    sys.stdout.flush()
    os._exit(0)


def run_one(name: str, folders: list[str]) -> dict:
    if name != "warm_read":
        evict(folders)
    else:
        w_read(folders)  # make sure the pages are there
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", name, *folders], stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    out = proc.stdout.read()
    _, status, _ = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed")
    return {"seconds": wall, **json.loads(out.decode().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=str(Path(__file__).parent / "out"))
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated workloads to skip (e.g. usual_approach)")
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    base, model = build_pair(root, args.size)
    folders = [str(base), str(model)]
    stored = sum(f.stat().st_size for d in folders for f in weight_files(Path(d)))
    names = [n for n in WORKLOADS if n not in args.skip.split(",")]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names:  # interleaved: each round runs every workload once
            runs[n].append(run_one(n, folders))
            print(f"round {r + 1} {n}: {runs[n][-1]['seconds']:.2f} s, {runs[n][-1]['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr)
    med = {n: statistics.median(x["seconds"] for x in v) for n, v in runs.items()}
    call = {n: statistics.median(x["call_s"] for x in v) for n, v in runs.items() if "call_s" in v[0]}
    imports = {n: statistics.median(x["import_s"] for x in v) for n, v in runs.items() if "import_s" in v[0]}
    rss = {n: max(x["peak_rss_mib"] for x in v) for n, v in runs.items()}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    print(f"\n{args.size}: two bf16 checkpoints, {stored / 1e9:.2f} GB stored; {machine}; median of {args.repeats}\n")
    print("| workload | wall (s) | GB/s stored | peak RSS (MiB) | of which: import / compare() call (s) |")
    print("|---|---:|---:|---:|---|")
    for n in names:
        split = f"{imports[n]:.2f} / {call[n]:.2f}" if n in call else ""
        print(f"| {n.replace('_', ' ')} | {med[n]:.2f} | {stored / 1e9 / med[n]:.2f} | {rss[n]:.0f} | {split} |")
    ratios = {}
    if "compare_full" in med:
        ratios["full / minimal loop"] = med["compare_full"] / med.get("minimal_loop", float("nan"))
        # the issue's floor: both checkpoints read cold, one after the other (`dd bs=16M`); the two-stream read,
        # which this machine serves faster, is reported beside it as a stricter floor
        if "cold_read" in med:
            ratios["full / cold read"] = med["compare_full"] / med["cold_read"]
        if "parallel_read" in med:
            ratios["full / parallel read (stricter floor)"] = med["compare_full"] / med["parallel_read"]
        ratios["full / sampled"] = med["compare_full"] / med.get("compare_sampled", float("nan"))
        if "usual_approach" in med:
            ratios["usual / full (time)"] = med["usual_approach"] / med["compare_full"]
            ratios["usual / full (RSS)"] = rss["usual_approach"] / rss["compare_full"]
    if "compare_full" in call and "compare_sampled" in call:
        # the interpreter and torch import are a fixed cost whatever the model size; sampling cuts the rest
        ratios["full / sampled (compare() call)"] = call["compare_full"] / call["compare_sampled"]
    print("\n| ratio | value | target | met |")
    print("|---|---:|---|---|")
    # (bound, at most?): the issue's four targets, then figures reported against bounds of our own
    targets = {"full / minimal loop": (1, True), "full / cold read": (2, True), "full / sampled": (5, False),
               "full / parallel read (stricter floor)": (2, True), "usual / full (time)": (2, False),
               "usual / full (RSS)": (4, False), "full / sampled (compare() call)": (5, False)}
    compare_rss = max((rss[n] for n in ("compare_full", "compare_sampled") if n in rss), default=float("nan"))
    rows = list(ratios.items()) + [("peak RSS of compare (MiB)", compare_rss)]
    targets["peak RSS of compare (MiB)"] = (1536, True)
    met = {}
    for k, v in rows:
        bound, at_most = targets[k]
        met[k] = v <= bound if at_most else v >= bound
        print(f"| {k} | {v:.2f} | {'≤' if at_most else '≥'} {bound} | {'yes' if met[k] else 'no'} |")
    issue = ("full / minimal loop", "full / cold read", "full / sampled", "peak RSS of compare (MiB)")
    if all(k in met for k in issue):
        print(f"\nthe issue's four targets in this run: {'all met' if all(met[k] for k in issue) else 'NOT all met'}")
    (root / "speed.json").write_text(json.dumps({"size": args.size, "stored_bytes": stored, "machine": machine,
                                                 "median_seconds": med, "import_seconds": imports,
                                                 "call_seconds": call, "peak_rss_mib": rss, "ratios": ratios,
                                                 "targets_met": met,
                                                 "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
