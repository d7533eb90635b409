# xgen in a container: `xgen serve` on /etc/xgen/models.yaml (the repository's, unless you mount
# your own directory there), with a llama-server built by `xgen install` and the default model.
#
#   podman build -t xgen .                       # or docker build; CPU llama-server
#   podman run -p 8000:8000 xgen                 # /v1, the status page, /health, /ready
#
# BASE is any Debian-like image with apt (Debian 12 by default). For NVIDIA GPUs build with
# FLAVOR=cuda, BASE a CUDA *devel* image and RUNTIME_BASE the matching CUDA runtime image, both
# with Python 3.10+ (see README, "Containers"), and run with the GPUs passed in
# (`--device nvidia.com/gpu=all`, or the NVIDIA device plugin on Kubernetes).
ARG BASE=debian:bookworm-slim
ARG RUNTIME_BASE=${BASE}

FROM ${BASE} AS build
ARG FLAVOR=cpu
ARG CUDAARCHS=90
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv g++ cmake ninja-build ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY reconciler /src/reconciler
RUN python3 -m venv /opt/xgen/venv && /opt/xgen/venv/bin/pip install --no-cache-dir /src
# ~/.cache/xgen is xgen's build cache (a build that mounts one skips the 12-minute compile);
# what the image keeps is copied out of it
RUN CUDAARCHS=${CUDAARCHS} /opt/xgen/venv/bin/xgen install --flavor ${FLAVOR} \
 && mkdir -p /opt/xgen/cache/llama-server \
 && cp -r /root/.cache/xgen/llama-server/*-${FLAVOR} /opt/xgen/cache/llama-server/ \
 && cp -r /root/.cache/xgen/models /opt/xgen/cache/

FROM ${RUNTIME_BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 xgen \
 && useradd --system --uid 10001 --gid xgen --home-dir /var/lib/xgen --create-home xgen
COPY --from=build /opt/xgen /opt/xgen
COPY models.yaml /etc/xgen/models.yaml
ENV PATH=/opt/xgen/venv/bin:$PATH \
    XGEN_CACHE_DIR=/opt/xgen/cache \
    PYTHONUNBUFFERED=1
USER xgen
WORKDIR /var/lib/xgen
EXPOSE 8000
# SIGTERM: /v1 drains, the backends stop, exit 0 (no orphan: they die with xgen)
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"
ENTRYPOINT ["xgen", "serve", "--host", "0.0.0.0", "--state-dir", "/var/lib/xgen"]
CMD ["/etc/xgen/models.yaml"]
