"""Command line: ``python -m fipo_megatron --config CONFIG.yaml [dotted.key=value ...]``.

    # one process (CPU or one GPU)
    python -m fipo_megatron --config examples/configs/tiny_cpu.yaml trainer.total_training_steps=5
    # several processes: torchrun sets RANK/WORLD_SIZE/MASTER_ADDR; NCCL on CUDA, gloo on CPU
    torchrun --nproc-per-node 2 -m fipo_megatron --config examples/configs/tiny_cpu.yaml parallel.tp=2

Overrides are parsed as YAML scalars (``actor.lr=1e-6``, ``algorithm.filter_groups.enable=false``). The
resolved config is written to ``<run_dir>/config.yaml``; ``checkpoint.resume=auto`` (the default, or
``--resume``) resumes from ``<run_dir>/checkpoints/latest`` when it exists; ``--resume CKPT`` from a given
checkpoint directory; ``--no-resume`` starts fresh.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys


def _init_distributed() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    kwargs = {}
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)  # NCCL binds this GPU instead of guessing
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(minutes=int(os.environ.get("FIPO_DIST_TIMEOUT_MIN", "60")))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / SLURM-style launch
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        return
    with socket.socket() as s:  # a lone process: a private rendezvous on a free local port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout,
                            **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fipo_megatron", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see examples/configs/)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                        help="resume from the run dir's latest checkpoint, or from CKPT (= checkpoint.resume=...)")
    parser.add_argument("--no-resume", action="store_true", help="start fresh (= checkpoint.resume=never)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    if args.resume is not None and args.no_resume:
        parser.error("--resume and --no-resume exclude each other")
    if args.resume is not None or args.no_resume:
        args.overrides.append(f"checkpoint.resume={'never' if args.no_resume else args.resume}")

    from fipo_megatron.config import load_config

    cfg = load_config(args.config, overrides=args.overrides)  # validate before any process group exists
    _init_distributed()
    import torch.distributed as dist

    from fipo_megatron.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
