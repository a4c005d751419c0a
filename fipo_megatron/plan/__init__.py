"""Check a recipe at full scale before booking the cluster: a dry run of every rank role at real shapes
(fake process group, meta device) and a per-GPU memory plan for training and rollout.

    python -m fipo_megatron.plan --config examples/configs/qwen2.5_32b_fipo.yaml --nnodes 4
    fipo-plan --config CFG [key=value ...] [--nnodes N --gpus-per-node G --gpu-memory-gib M]

See ``docs/plan.md``; the pieces are ``plan.recipe`` (config, cluster, HF config), ``plan.dry_run``,
``plan.memory`` and ``plan.report``.
"""

from fipo_megatron.plan.report import Plan, format_plan, make_plan

__all__ = ["Plan", "format_plan", "make_plan"]
