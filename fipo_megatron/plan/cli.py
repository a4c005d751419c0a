"""Command line of the planner.

    python -m fipo_megatron.plan --config examples/configs/qwen2.5_math_7b_fipo.yaml            # 1 node
    python -m fipo_megatron.plan --config examples/configs/qwen2.5_32b_fipo.yaml --nnodes 4
    python -m fipo_megatron.plan --config examples/configs/qwen2.5_32b_fipo.yaml --nnodes 4 parallel.cp=1
    fipo-plan --config CFG [dotted.key=value ...] [--nnodes N] [--gpus-per-node G] [--gpu-memory-gib M]
              [--reserve-gib R] [--hf-config DIR] [--shard-keys]

Runs on a laptop (CPU, one process, no GPU, no model weights). Exit status: 0 when the plan fits, 2 when
it does not fit (the report names the smallest change that would), 3 for a layout or mapping error.
``--nnodes`` defaults to the fewest nodes one model replica needs.
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT = {"fits": 0, "does not fit": 2, "layout error": 3, "mapping error": 3}


def main(argv: list[str] | None = None) -> int:
    """Print the plan of ``--config`` (the module docstring's arguments); return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fipo_megatron.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see examples/configs/)")
    parser.add_argument("--nnodes", type=int, default=None, help="nodes (default: one model replica's worth)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=79.6,
                        help="memory of one GPU in GiB as nvidia-smi reports it (H100/A100 80GB: 79.6)")
    parser.add_argument("--reserve-gib", type=float, default=4.0,
                        help="per GPU, for the CUDA context, NCCL and allocator fragmentation")
    parser.add_argument("--hf-config", default=None, help="the model's config.json (or its directory)")
    parser.add_argument("--shard-keys", action="store_true", help="list every rank role's checkpoint shards")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    logging.getLogger("fipo_megatron").setLevel(logging.WARNING)  # the report is the output

    from fipo_megatron.plan.report import format_plan, make_plan

    plan = make_plan(args.config, overrides=args.overrides, nnodes=args.nnodes, gpus_per_node=args.gpus_per_node,
                     gpu_memory_gib=args.gpu_memory_gib, reserve_gib=args.reserve_gib, hf_config_path=args.hf_config)
    sys.stdout.write(format_plan(plan, shard_keys=args.shard_keys) + "\n")
    return EXIT[plan.verdict]


if __name__ == "__main__":
    sys.exit(main())
