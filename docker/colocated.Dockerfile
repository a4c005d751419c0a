# The colocated image: SGLang's official image (its torch, SGLang and their pins, untouched) with the Megatron
# side added, for runs whose rollout engine lives in the trainer's processes (rollout.engine: sglang).
#
#   docker build -f docker/colocated.Dockerfile -t fipo_megatron:colocated .
#   docker run --gpus all --ipc=host --network=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /models:/models -v $PWD/data:/workspace/fipo_megatron/data -v $PWD/runs:/workspace/fipo_megatron/runs \
#       fipo_megatron:colocated bash examples/run_qwen2.5_math_7b.sh
#
# Transformer Engine's PyTorch extension has no wheel on PyPI (transformer-engine-torch is a source distribution
# that compiles against the installed torch), so this build COMPILES IT FROM SOURCE against the image's torch
# 2.14.1+cu130 with the image's CUDA 13 toolkit: tens of minutes and several GB of memory per job. Use the full
# SGLang image (it has nvcc), not a "-runtime" tag. Apex is not installed: megatron-core and this package run
# without it (Transformer Engine supplies the fused kernels).
#
# Every pip step below resolves against the image's packages (docker/base_images/sglang-v0.5.23.toml):
# `python tools/check_image_deps.py docker/colocated.Dockerfile` proves it with pip's resolver, without Docker;
# the Transformer Engine compile itself has not been run here.
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23
FROM ${SGLANG_IMAGE}

ARG MEGATRON_CORE_VERSION=0.19.2
ARG TE_VERSION=2.20.2
ARG MODELOPT_VERSION=0.47.0
# CUDA architectures the TE extension is compiled for (90: H100/H200; add 100 for B200) and parallel compile jobs.
ARG TE_CUDA_ARCHS=90
ARG TE_BUILD_JOBS=8

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/fipo_megatron

# SGLang's image has no pip constraint file: pin everything it holds (torch, transformers, sglang and every pin of
# theirs) before adding anything, and install only under that file, so nothing below can move them.
RUN mkdir -p /etc/fipo && pip list --format=freeze > /etc/fipo/sglang-image-constraints.txt

# Transformer Engine's Python package and CUDA 13 core library (wheels), the PyTorch extension's own requirements
# (from its sdist's metadata: einops, onnx, onnxscript, packaging, pydantic, nvdlfw-inspect,
# nvidia-cudnn-frontend), megatron-core and nvidia-modelopt. The unpinned names are pinned by the image's list.
RUN pip install -c /etc/fipo/sglang-image-constraints.txt \
        "transformer-engine[core_cu13]==${TE_VERSION}" \
        "onnx==1.23.2" "onnxscript==0.7.2" "nvdlfw-inspect==0.2.2" \
        einops packaging pydantic nvidia-cudnn-frontend \
        "megatron-core==${MEGATRON_CORE_VERSION}" "nvidia-modelopt==${MODELOPT_VERSION}"

# The PyTorch extension, compiled against the image's torch (no build isolation: a build environment would fetch
# a different torch from PyPI; no deps: they are all installed above, which the check verifies).
RUN NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS="${TE_CUDA_ARCHS}" MAX_JOBS="${TE_BUILD_JOBS}" \
    pip install -c /etc/fipo/sglang-image-constraints.txt --no-build-isolation --no-deps \
        "transformer-engine-torch==${TE_VERSION}"

COPY pyproject.toml README.md ./
COPY fipo_megatron ./fipo_megatron
COPY examples ./examples
COPY tools ./tools
COPY docker ./docker
RUN pip install -c /etc/fipo/sglang-image-constraints.txt -e ".[data,logging,math-verify]" \
    && python -c "import torch, sglang, transformer_engine.pytorch, megatron.core, fipo_megatron; print('torch', torch.__version__, 'sglang', sglang.__version__, 'mcore', megatron.core.__version__)"

COPY tests ./tests
CMD ["bash"]
