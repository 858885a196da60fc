# GPU image for clusters: CUDA PyTorch 2.13.0, the pinned requirements, DeepSpeed's GPU ops prebuilt,
# and megatron-glm installed. Build and run (on a machine with Docker and the NVIDIA container toolkit):
#
#   docker build -t megatron-glm .
#   docker run --gpus all --ipc=host --network=host -v /data:/data megatron-glm \
#       glm-pretrain --config run/configs/glm-large.yaml
#
# CUDA_IMAGE and TORCH_INDEX must name the same CUDA version (the devel image compiles DeepSpeed's ops
# against the CUDA that torch was built with). TORCH_CUDA_ARCH_LIST selects the GPUs the ops are built for.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0"
# Set to 1 to build NVIDIA apex from source (FusedLayerNorm, FusedAdam). Never from PyPI: the PyPI package
# named "apex" is an unrelated project.
ARG INSTALL_APEX=0

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}

RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv git ninja-build build-essential \
        openmpi-bin libopenmpi-dev openssh-client pdsh libaio-dev \
    && rm -rf /var/lib/apt/lists/*

# One virtual environment on PATH (Ubuntu 24.04's system Python refuses global pip installs).
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/megatron-glm
COPY requirements.txt requirements-dev.txt ./

# torch first, from the CUDA index, so nothing else can pick another build.
RUN pip install --upgrade pip \
    && pip install "torch==2.13.0" --index-url ${TORCH_INDEX} \
    && grep -vE '^(torch|deepspeed)==' requirements.txt > requirements-rest.txt \
    && pip install -r requirements-rest.txt -r requirements-dev.txt \
    && rm requirements-rest.txt

# DeepSpeed with the ops that matter on GPUs compiled now instead of JIT-compiled on every node at start:
# fused Adam, CPU Adam (ZeRO-Offload), the utils (flatten/unflatten) and async I/O (NVMe offload).
RUN DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 DS_BUILD_AIO=1 \
    pip install --no-build-isolation "$(grep -E '^deepspeed==' requirements.txt)" \
    && ds_report

RUN if [ "$INSTALL_APEX" = "1" ]; then \
        git clone --depth 1 https://github.com/NVIDIA/apex apex-src \
        && (cd apex-src && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install --no-build-isolation .) \
        && rm -rf apex-src; \
    fi

COPY . .
RUN pip install --no-deps -e .

# Multi-node jobs launched by mpirun inside the container run as root.
ENV OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
CMD ["bash"]
