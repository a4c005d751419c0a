# fipo_megatron on an NGC PyTorch image: CUDA torch, Transformer Engine and Apex come with the base image;
# megatron-core, SGLang and nvidia-modelopt are added on top (never re-installing torch).
#
#   docker build -t fipo_megatron:latest .
#   docker build --build-arg NGC_TAG=25.04-py3 --build-arg SGLANG_VERSION=0.4.6.post5 -t fipo_megatron:25.04 .
#   docker run --gpus all --ipc=host --network=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /models:/models -v /data:/workspace/fipo_megatron/data -v $PWD/runs:/workspace/fipo_megatron/runs \
#       fipo_megatron:latest bash examples/run_qwen2.5_math_7b.sh
#
# Multi-node: start one container per node with --network=host and the NNODES / NODE_RANK / MASTER_ADDR /
# MASTER_PORT environment of examples/launch_multinode.sh; runs/ must be a shared filesystem.
ARG NGC_TAG=25.04-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

ARG MEGATRON_CORE_VERSION=">=0.16.1"
ARG SGLANG_VERSION=""
ARG MODELOPT_VERSION=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/fipo_megatron

# Pin the image's own torch / TE / flash-attn so no dependency can swap them for a PyPI build.
RUN pip list --format=freeze | grep -iE '^(torch|transformer[-_]engine|flash[-_]attn|triton|apex)==' > /tmp/constraints.txt \
    && cat /tmp/constraints.txt

# SGLang first (it has the strictest pins), then megatron-core and modelopt, all under the constraints.
# SGLang releases pin one torch version: pick the NGC tag whose torch matches the SGLang release (the build
# fails loudly at this step otherwise, rather than replacing the image's CUDA torch).
RUN PIP_CONSTRAINT=/tmp/constraints.txt pip install "sglang[srt]${SGLANG_VERSION:+==${SGLANG_VERSION}}" \
    && PIP_CONSTRAINT=/tmp/constraints.txt pip install "megatron-core${MEGATRON_CORE_VERSION}" \
       "nvidia-modelopt[torch]${MODELOPT_VERSION:+==${MODELOPT_VERSION}}"

COPY pyproject.toml README.md* ./
COPY fipo_megatron ./fipo_megatron
COPY examples ./examples
COPY tools ./tools
RUN PIP_CONSTRAINT=/tmp/constraints.txt pip install -e ".[data,logging,math-verify]" \
    && python -c "import torch, megatron.core, transformers, sglang; print('torch', torch.__version__, 'mcore', megatron.core.__version__, 'transformers', transformers.__version__, 'sglang', sglang.__version__)"

COPY tests ./tests
CMD ["bash"]
