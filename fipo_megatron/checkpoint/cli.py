"""Command lines of the offline converters (also installed as ``fipo-convert-*`` console scripts).

    python tools/convert_hf_to_megatron.py --hf-dir HF --out CKPT --tp N --pp M [--force]
    python tools/convert_megatron_to_hf.py --ckpt-dir CKPT --hf-dir HF_REF --out OUT [--force]

Both run in one CPU process (CUDA is hidden from them: conversion is I/O and copies, and a GPU could
not hold a model that a node's host memory can). Errors in the input (unknown architecture, a tensor
of the wrong shape, a missing file, a non-empty output directory without ``--force``) end the program
with exit status 2 and a one-line message; nothing is left under the output path.
"""

from __future__ import annotations

import argparse
import os
import sys


def _hide_cuda() -> None:
    # Only when run as a program: once torch is imported (tests, a caller's process) the environment
    # is left alone, so no later CUDA user in that process is affected.
    if "torch" not in sys.modules:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def _run(fn, **kwargs) -> int:
    try:
        fn(**kwargs)
    except (ValueError, FileNotFoundError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.stderr.write(f"error: {message}\n")
        return 2
    return 0


def hf_to_megatron_main(argv: list[str] | None = None) -> int:
    """``--hf-dir HF --out CKPT --tp N --pp M [--force]``: HF safetensors -> Megatron dist checkpoint."""
    parser = argparse.ArgumentParser(description="Convert a Hugging Face model directory to a Megatron "
                                     "dist checkpoint (layout-free: loads at any tp/pp).")
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="intended tensor-parallel size (validated and recorded)")
    parser.add_argument("--pp", type=int, default=1, help="intended pipeline-parallel size (validated and recorded)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    _hide_cuda()
    from fipo_megatron.checkpoint.convert import convert_hf_to_megatron

    return _run(convert_hf_to_megatron, hf_dir=args.hf_dir, out_dir=args.out, tp=args.tp, pp=args.pp,
                force=args.force)


def megatron_to_hf_main(argv: list[str] | None = None) -> int:
    """``--ckpt-dir CKPT --hf-dir HF_REF --out OUT [--force]``: Megatron dist checkpoint -> HF safetensors."""
    parser = argparse.ArgumentParser(description="Convert a Megatron dist checkpoint (any saved layout) to a "
                                     "Hugging Face model directory.")
    parser.add_argument("--ckpt-dir", required=True, help="Megatron dist checkpoint directory")
    parser.add_argument("--hf-dir", required=True, help="reference HF directory: config.json and tokenizer files")
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size (GiB)")
    args = parser.parse_args(argv)
    _hide_cuda()
    from fipo_megatron.checkpoint.convert import convert_megatron_to_hf

    return _run(convert_megatron_to_hf, ckpt_dir=args.ckpt_dir, hf_ref_dir=args.hf_dir, out_dir=args.out,
                force=args.force, max_shard_bytes=int(args.max_shard_size_gb * 1024**3))
