# specmesh image: every service and the gateway (`specmesh serve verify|draft|cache|gateway`).
#   CPU (default):  docker build -t specmesh .
#   CUDA:           docker build -t specmesh --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg EXTRAS=serve,cuda .
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=serve
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/specmesh
COPY pyproject.toml README.md ./
COPY protos protos
COPY kernels kernels
COPY model_service model_service
COPY draft_service draft_service
COPY verify_service verify_service
COPY cache_service cache_service
COPY clients clients
COPY loadtest loadtest
RUN pip install --no-cache-dir torch --index-url "${TORCH_INDEX}" \
    && pip install --no-cache-dir ".[${EXTRAS}]"
# the CPU kernels are built on first use into this cache (a volume keeps them across restarts)
ENV SPECMESH_KERNEL_CACHE=/var/cache/specmesh PYTHONUNBUFFERED=1
RUN useradd --create-home specmesh && mkdir -p /var/cache/specmesh \
    && chown specmesh /var/cache/specmesh
USER specmesh
ENTRYPOINT ["specmesh"]
CMD ["--help"]
