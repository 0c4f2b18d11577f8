"""GPU check: the same comparison with --device cuda and --device cpu gives the same statistics; times both.

    python benchmarks/gpu_check.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from hf_provenance.compare import compare
    from hf_provenance.factory import apply_transform, build_random

    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/gpu_check")
    args = ap.parse_args()
    root = Path(args.dir)
    sizes = dict(hidden=1024, layers=8, intermediate=4096, vocab=32000, dtype="bfloat16")
    if (root / "other" / "config.json").exists():  # built by an earlier run: reuse
        base, noisy, other = root / "base", root / "noisy", root / "other"
    else:
        import shutil

        for sub in ("base", "noisy", "other"):  # a run killed half-way leaves partial folders
            shutil.rmtree(root / sub, ignore_errors=True)
        base = build_random("llama", root / "base", seed=0, **sizes)
        noisy = apply_transform(base, root / "noisy", "noise", scale=0.5)
        other = build_random("llama", root / "other", seed=1, **sizes)
    out = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for name, model in (("noisy", noisy), ("other", other)):
        for dev in ("cuda", "cpu"):
            t0 = time.perf_counter()
            c = compare(str(model), [str(base)], device=dev).to_dict()["comparisons"][0]
            out[f"{name}:{dev}"] = {"verdict": c["verdict"], "seconds": round(time.perf_counter() - t0, 2),
                                    "overall_r": c["overall"]["pearson"]["value"],
                                    "tensor_r": [t["pearson"]["value"] for t in c["tensors"]][:50]}
        a, b = out[f"{name}:cuda"], out[f"{name}:cpu"]
        diffs = [abs(x - y) for x, y in zip(a["tensor_r"], b["tensor_r"]) if x is not None and y is not None]
        out[f"{name}:max_abs_r_difference"] = max(diffs) if diffs else None
        print(f"{name}: cuda {a['verdict']} in {a['seconds']} s, cpu {b['verdict']} in {b['seconds']} s, "
              f"max |r_cuda - r_cpu| = {out[f'{name}:max_abs_r_difference']}", flush=True)
    print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != 'tensor_r'})
                      for k, v in out.items()}))


if __name__ == "__main__":
    main()
