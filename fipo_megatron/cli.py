"""Command line: ``python -m fipo_megatron --config CONFIG.yaml [dotted.key=value ...]``.

    # one process (CPU or one GPU)
    python -m fipo_megatron --config examples/configs/tiny_cpu.yaml trainer.total_training_steps=5
    # several processes: torchrun sets RANK/WORLD_SIZE/MASTER_ADDR; NCCL on CUDA, gloo on CPU
    torchrun --nproc-per-node 2 -m fipo_megatron --config examples/configs/tiny_cpu.yaml parallel.tp=2

Overrides are parsed as YAML scalars (``actor.lr=1e-6``, ``algorithm.filter_groups.enable=false``) and may
come before or after the flags. The resolved config is written to ``<run_dir>/config.yaml``; a resume
logs every key that differs from the config the run was started with. ``checkpoint.resume=auto`` (the
default, or ``--resume``) resumes from the newest intact checkpoint under ``<run_dir>/checkpoints``;
``--resume CKPT`` (or ``--resume=CKPT``) from a given checkpoint directory; ``--no-resume`` starts fresh.
A fresh run refuses a run directory that holds an earlier run unless ``trainer.overwrite=true``.

Before any process group, model or data exists, the layout is checked against the world size and the
model (tp x pp x cp must divide the world; heads and layers must divide by tp and pp). The process group
is then set up by ``parallel.topology.init_distributed``; ``FIPO_DIST_TIMEOUT_MIN`` (minutes, default 60)
is how long a collective may wait.

Exit codes: 0 done; 3 stopped because the run diverged (``trainer.max_consecutive_skipped_steps``) or its
weights are not finite; 143 stopped by SIGTERM (after saving at the next step boundary); 1 any other error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*=")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """``(args, overrides)``; ``--resume``/``--no-resume`` become a ``checkpoint.resume`` override."""
    parser = argparse.ArgumentParser(prog="python -m fipo_megatron", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see examples/configs/)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                        help="resume from the run dir's newest intact checkpoint, or from CKPT "
                             "(= checkpoint.resume=...)")
    parser.add_argument("--no-resume", action="store_true", help="start fresh (= checkpoint.resume=never)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    argv = list(sys.argv[1:] if argv is None else argv)
    # "--resume a.b=1": the override is not a checkpoint path (argparse would take it as CKPT).
    for i, token in enumerate(argv[:-1]):
        if token == "--resume" and _OVERRIDE.match(argv[i + 1]):
            argv[i] = "--resume=auto"
    args = parser.parse_intermixed_args(argv)
    if args.resume is not None and args.no_resume:
        parser.error("--resume and --no-resume exclude each other")
    overrides = list(args.overrides)
    bad = [o for o in overrides if not _OVERRIDE.match(o)]
    if bad:
        parser.error(f"expected dotted.key=value overrides, got {bad}")
    if args.resume is not None or args.no_resume:
        overrides.append(f"checkpoint.resume={'never' if args.no_resume else args.resume}")
    return args, overrides


def check_layout(cfg, *, world_size: int) -> None:
    """tp x pp x cp against the world size and the model's heads and layers (ValueError), before anything heavy."""
    from fipo_megatron.parallel.topology import validate_layout

    num_heads = num_kv = num_layers = None
    path = cfg.model.path
    if path.startswith("tiny:"):
        from fipo_megatron.testing.tiny_models import tiny_hf_config

        hf = tiny_hf_config(path[len("tiny:"):], **cfg.model.tiny_overrides)
    elif os.path.isfile(os.path.join(path, "config.json")):
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    else:
        raise ValueError(f"model.path {path!r}: no config.json there (an HF model directory or tiny:<family>)")
    num_heads = getattr(hf, "num_attention_heads", None)
    num_kv = getattr(hf, "num_key_value_heads", None) or num_heads
    num_layers = getattr(hf, "num_hidden_layers", None)
    validate_layout(cfg.parallel, world_size=world_size, num_attention_heads=num_heads, num_query_groups=num_kv,
                    num_layers=num_layers)


def _report_config_changes(cfg) -> None:
    import yaml

    from fipo_megatron.config import config_to_dict
    from fipo_megatron.guards import config_changes
    from fipo_megatron.log import get_logger

    path = os.path.join(cfg.run_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = yaml.safe_load(f) or {}
    changes = [c for c in config_changes(old, config_to_dict(cfg)) if not c.startswith("checkpoint.resume:")]
    if changes:
        get_logger(__name__).warning("resuming with a config that differs from %s (which is now replaced):\n  %s",
                                     path, "\n  ".join(changes))


def main(argv: list[str] | None = None) -> int:
    """Run training from the command line (``argv`` without the program name; ``sys.argv`` by default) and
    return the exit code of the module docstring. Config and layout errors are raised before any process
    group exists; the process group is destroyed on the way out, whatever happened."""
    args, overrides = parse_args(argv)

    from fipo_megatron.config import load_config
    from fipo_megatron.guards import RunStopped, prepare_run_dir
    from fipo_megatron.log import get_logger

    cfg = load_config(args.config, overrides=overrides)  # validate before any process group exists
    check_layout(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    resuming = prepare_run_dir(cfg.run_dir, resume=cfg.checkpoint.resume, resume_requested=args.resume is not None,
                               overwrite=cfg.trainer.overwrite, remove=rank0)
    if resuming and rank0:
        _report_config_changes(cfg)
    import torch.distributed as dist

    from fipo_megatron.parallel import topology
    from fipo_megatron.trainer import Trainer

    topology.init_distributed()

    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.fit()
    except RunStopped as e:
        get_logger(__name__).error("%s", e)
        return e.exit_code
    finally:
        if trainer is not None:
            trainer.close()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
