#!/usr/bin/env python
"""Peak host memory of the offline converters against the model's size.

    python tools/benchmarks/bench_convert_memory.py [--workdir /tmp/bench_convert] [--dtype bf16] [--keep]

Writes a random Qwen2-0.5B-shaped model (24 layers, hidden 896, 14 heads / 2 KV heads, FFN 4864,
vocab 151936, tied embeddings: ~494M parameters) straight to safetensors, then runs, each in a fresh
process, (1) a baseline that imports torch + megatron-core and sets up the one-process gloo group and
Megatron's groups exactly as the converters do, (2) ``tools/convert_hf_to_megatron.py``, (3)
``tools/convert_megatron_to_hf.py``. Each process reports its own peak RSS (``VmHWM`` of
/proc/self/status: unlike ``ru_maxrss`` it is reset by exec, so the parent's footprint does not leak
into the child's figure); the script prints
``(peak - baseline) / model bytes`` for both directions (target <= 1.5) and checks that the round trip
is bit-exact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=True)

# Runs in the measured child: the same set-up the converters do, without a model.
_BASELINE = """
import os, sys, tempfile
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist, transformers
from fipo_megatron.checkpoint import convert
from fipo_megatron.parallel.topology import ParallelConfig, initialize_parallel
from megatron.core import dist_checkpointing
from megatron.core.models.gpt import GPTModel
cfg = convert.load_hf_config({hf!r})
dist.init_process_group("gloo", init_method="file://" + tempfile.mkdtemp() + "/s", rank=0, world_size=1)
initialize_parallel(ParallelConfig(), hf_config=cfg)
print("MAXRSS", [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""

# Runs a converter CLI in the measured child and reports its peak RSS.
_RUN_TOOL = """
import runpy, sys
sys.argv = {argv!r}
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    if e.code not in (0, None):
        raise
print("MAXRSS", [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def write_random_model(hf_dir: str, dtype_name: str) -> int:
    """A random Qwen2-0.5B-like HF directory, written tensor by tensor; returns the weights' bytes."""
    import torch
    import transformers

    from fipo_megatron.checkpoint.hf_io import TensorSpec, write_safetensors_shards
    from fipo_megatron.checkpoint.registry import get_mapping

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    config = transformers.Qwen2Config(**QWEN2_05B)
    config.architectures = ["Qwen2ForCausalLM"]
    mapping = get_mapping(config)
    specs = [TensorSpec(name=n, shape=mapping.hf_expected_shape(n), dtype=dtype) for n in mapping.hf_names()]
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for spec in specs:
            yield spec.name, (0.02 * torch.randn(spec.shape, generator=gen)).to(dtype)

    os.makedirs(hf_dir, exist_ok=True)
    write_safetensors_shards(hf_dir, specs=specs, tensors=tensors(), max_shard_bytes=512 * 1024**2)
    config.save_pretrained(hf_dir)
    return sum(s.num_bytes for s in specs)


def measure(code: str) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of ``python -c code`` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MAXRSS")][-1]
    return int(line.split()[1]) * 1024, wall  # VmHWM is in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a new temp dir)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    hf, ckpt, out = (os.path.join(work, n) for n in ("hf", "ckpt", "hf_out"))
    for path in (ckpt, out):
        shutil.rmtree(path, ignore_errors=True)
    try:
        model_bytes = write_random_model(hf, args.dtype)
        base, base_s = measure(_BASELINE.format(repo=REPO, hf=hf))
        to_mcore, to_mcore_s = measure(_RUN_TOOL.format(argv=[os.path.join(REPO, "tools/convert_hf_to_megatron.py"),
                                                              "--hf-dir", hf, "--out", ckpt, "--tp", "1", "--pp", "1"]))
        to_hf, to_hf_s = measure(_RUN_TOOL.format(argv=[os.path.join(REPO, "tools/convert_megatron_to_hf.py"),
                                                        "--ckpt-dir", ckpt, "--hf-dir", hf, "--out", out]))
        from fipo_megatron.checkpoint.hf_io import HFCheckpointReader

        src, dst = HFCheckpointReader(hf), HFCheckpointReader(out)
        exact = src.names() == dst.names() and all(
            bool((src.get(n) == dst.get(n)).all()) for n in src.names())
        gib = 1024**3
        result = {
            "model": "Qwen2-0.5B-shaped, random", "dtype": args.dtype, "model_bytes": model_bytes,
            "baseline_rss_bytes": base,
            "hf_to_megatron": {"peak_rss_bytes": to_mcore, "over_baseline_ratio": (to_mcore - base) / model_bytes,
                               "wall_s": round(to_mcore_s, 1)},
            "megatron_to_hf": {"peak_rss_bytes": to_hf, "over_baseline_ratio": (to_hf - base) / model_bytes,
                               "wall_s": round(to_hf_s, 1)},
            "round_trip_bit_exact": exact,
        }
        print(f"model weights: {model_bytes / gib:.3f} GiB ({args.dtype}); baseline RSS (torch + megatron + "
              f"groups): {base / gib:.3f} GiB ({base_s:.1f} s)")
        for key in ("hf_to_megatron", "megatron_to_hf"):
            r = result[key]
            print(f"{key:15s} peak RSS {r['peak_rss_bytes'] / gib:.3f} GiB, over baseline "
                  f"{(r['peak_rss_bytes'] - base) / gib:.3f} GiB = {r['over_baseline_ratio']:.2f}x model "
                  f"(target <= 1.5x), wall {r['wall_s']} s")
        print(f"round trip bit-exact: {exact}")
        print(json.dumps(result))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
