# The trainer image: NVIDIA's PyTorch container (its own CUDA torch, Transformer Engine and Apex), with
# megatron-core, nvidia-modelopt and this package added under the image's own pip constraint file, so no step can
# replace the image's torch. No rollout engine is installed here: SGLang pins one exact torch release and NGC
# images carry a pre-release build (25.12: 2.10.0a0+b4e4ee81d3), so the two cannot share a Python environment.
# Rollouts come from SGLang servers in SGLang's own image (examples/launch_sglang_servers.sh), or from the
# colocated image (docker/colocated.Dockerfile). docs/containers.md says which image runs what.
#
#   docker build -t fipo_megatron:trainer .
#   docker run --gpus all --ipc=host --network=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /models:/models -v $PWD/data:/workspace/fipo_megatron/data -v $PWD/runs:/workspace/fipo_megatron/runs \
#       fipo_megatron:trainer bash examples/launch_multinode.sh examples/configs/qwen2.5_math_7b_fipo_servers.yaml
# (with SGLang servers already up on the rollout nodes: examples/launch_sglang_servers.sh; multi-node: add
# -e NNODES=N -e NODE_RANK=<i> -e MASTER_ADDR=<node 0>, and runs/ on a shared filesystem)
#
# Every pip step below resolves against the image's packages (docker/base_images/ngc-pytorch-25.12.toml):
# `python tools/check_image_deps.py Dockerfile` proves it with pip's resolver, without Docker. Changing NGC_TAG
# needs a manifest for that tag.
ARG NGC_TAG=25.12-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

# megatron-core 0.17+ needs Python >= 3.12 (the image's); both versions below resolve against the image's torch.
ARG MEGATRON_CORE_VERSION=0.19.2
ARG MODELOPT_VERSION=0.47.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/fipo_megatron

# The image's constraint file (/etc/pip/constraint.txt) stays in force for every install: torch, TE, Apex,
# flash-attn and Triton keep the image's builds.
RUN pip install "megatron-core==${MEGATRON_CORE_VERSION}" "nvidia-modelopt==${MODELOPT_VERSION}"

COPY pyproject.toml README.md ./
COPY fipo_megatron ./fipo_megatron
COPY examples ./examples
COPY tools ./tools
COPY docker ./docker
RUN pip install -e ".[data,logging,math-verify]" \
    && python -c "import torch, transformer_engine, megatron.core, transformers, fipo_megatron; print('torch', torch.__version__, 'mcore', megatron.core.__version__, 'transformers', transformers.__version__)"

COPY tests ./tests
CMD ["bash"]
