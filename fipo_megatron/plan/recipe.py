"""What a plan starts from: the run config, the cluster, and the HF config of the recipe's model.

The recipes name models by path (``model.path: /models/Qwen2.5-32B``) that exist only on the cluster. The
planner reads ``<model.path>/config.json`` when it is there, else the copy stored in the package under
``fipo_megatron/models/hf_configs/<basename of model.path>/config.json`` (sources in that folder's
README), else the file given with ``--hf-config``. ``tiny:<family>`` builds the tiny config the trainer
would build (``testing.tiny_models``), sized to the recipe's tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from fipo_megatron.config import FipoConfig

HF_CONFIG_DIR = Path(__file__).resolve().parent.parent / "models" / "hf_configs"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cluster:
    """The machines a plan is for.

    Fields:
        nnodes: nodes in the job.
        gpus_per_node: GPUs (ranks) per node.
        gpu_memory_gib: memory of one GPU in GiB (80 GB H100 = 79.6 GiB usable by CUDA; pass what
            ``nvidia-smi`` reports as total).
        reserve_gib: memory per GPU that no tensor of ours can use: CUDA context, NCCL buffers, the caching
            allocator's fragmentation.
    """

    nnodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 79.6
    reserve_gib: float = 4.0

    def __post_init__(self):
        for name in ("nnodes", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Cluster.{name} must be an int >= 1, got {value!r}")
        if not self.gpu_memory_gib > 0:
            raise ValueError(f"Cluster.gpu_memory_gib must be > 0, got {self.gpu_memory_gib!r}")
        if not 0 <= self.reserve_gib < self.gpu_memory_gib:
            raise ValueError(f"Cluster.reserve_gib must be in [0, gpu_memory_gib), got {self.reserve_gib!r}")

    @property
    def world_size(self) -> int:
        """Ranks in the job: one per GPU."""
        return self.nnodes * self.gpus_per_node

    @property
    def gpu_bytes(self) -> int:
        """``gpu_memory_gib`` in bytes."""
        return int(self.gpu_memory_gib * 2**30)

    @property
    def reserve_bytes(self) -> int:
        """``reserve_gib`` in bytes."""
        return int(self.reserve_gib * 2**30)


def default_cluster(cfg: FipoConfig, *, nnodes: int | None = None, gpus_per_node: int = 8,
                    gpu_memory_gib: float = 79.6, reserve_gib: float = 4.0) -> Cluster:
    """The cluster to plan for: ``nnodes`` as given, else the fewest nodes one model replica needs."""
    if nnodes is None:
        nnodes = max(1, math.ceil(cfg.parallel.model_parallel_size / gpus_per_node))
    return Cluster(nnodes=nnodes, gpus_per_node=gpus_per_node, gpu_memory_gib=gpu_memory_gib, reserve_gib=reserve_gib)


def load_hf_config(cfg: FipoConfig, *, hf_config_path: str | None = None):
    """``(transformers config, where it came from)`` for the recipe's model (see the module docstring)."""
    import transformers

    if hf_config_path:
        path = Path(hf_config_path)
        path = path.parent if path.name == "config.json" else path
        return transformers.AutoConfig.from_pretrained(str(path)), str(path / "config.json")
    model_path = cfg.model.path
    if model_path.startswith("tiny:"):
        from fipo_megatron.build import build_tokenizer
        from fipo_megatron.testing.tiny_models import tiny_hf_config

        tokenizer = build_tokenizer(cfg)
        return (tiny_hf_config(model_path[len("tiny:"):], vocab_size=len(tokenizer), **cfg.model.tiny_overrides),
                f"{model_path} (testing.tiny_models, vocabulary {len(tokenizer)})")
    if os.path.isfile(os.path.join(model_path, "config.json")):
        return transformers.AutoConfig.from_pretrained(model_path), os.path.join(model_path, "config.json")
    stored = HF_CONFIG_DIR / Path(model_path.rstrip("/")).name
    if (stored / "config.json").is_file():
        source = stored.relative_to(HF_CONFIG_DIR.parents[1]) / "config.json"
        return transformers.AutoConfig.from_pretrained(str(stored)), str(source)
    known = sorted(p.name for p in HF_CONFIG_DIR.iterdir() if (p / "config.json").is_file())
    raise ValueError(f"model.path {model_path!r}: no config.json there and no stored config named "
                     f"{Path(model_path).name!r} (stored: {known}); pass --hf-config PATH")


def hf_state_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF model's state dict and its shape: the transformers class built on the meta
    device from ``hf_config`` (nothing is allocated)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
