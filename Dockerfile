# chunkfs-csi: one image for every role (controller, node, mounter).
#
#   bash scripts/build-image.sh [TAG]          # or: docker build -t chunkfs-csi:dev .
#
# Debian's python3 and fuse3, the project installed from this checkout into a venv at
# /opt/chunkfs-csi, nothing fetched at run time. No architecture-specific step: the
# same file builds on amd64 and arm64 (pyfuse3 is compiled here, grpcio comes as a
# wheel for both). The build stage may be handed an extra CA bundle for pip as the
# BuildKit secret `pip-ca` (a TLS-intercepting proxy); it never reaches a layer.
#
# The default user is the unprivileged `chunkfs` (uid 10001): the controller runs as
# it. The node plugin and the mounter mount filesystems and run as root (the chart
# sets that, with the privileges it needs, in their securityContext).

ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates gcc libc6-dev libfuse3-dev pkg-config python3 python3-dev python3-venv \
 && rm -rf /var/lib/apt/lists/*
# The dependencies first, from pyproject.toml alone: this layer stays cached while only
# the code changes.
COPY pyproject.toml /src/
RUN --mount=type=secret,id=pip-ca,required=false \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python3 -m venv /opt/chunkfs-csi \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' >/tmp/requirements.txt \
 && /opt/chunkfs-csi/bin/pip install -r /tmp/requirements.txt "setuptools>=68"
COPY chunkfs /src/chunkfs
COPY csi /src/csi
RUN /opt/chunkfs-csi/bin/pip install --no-deps --no-build-isolation /src \
 && /opt/chunkfs-csi/bin/python -c "import pyfuse3, grpc, chunkfs.cli, csi.server"

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# fuse3: fusermount3 and /etc/fuse.conf; mount/util-linux: bind mounts and umount;
# tini: PID 1 that reaps the detached mount processes and forwards signals.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates fuse3 libfuse3-3 mount python3 tini util-linux \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 chunkfs \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin chunkfs
COPY --from=build /opt/chunkfs-csi /opt/chunkfs-csi
ENV PATH=/opt/chunkfs-csi/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN chunkfs-csi --help >/dev/null && chunkfs --help >/dev/null
# Build arguments last: their values change at every build and would otherwise
# invalidate the cached layers above.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="chunkfs-csi" \
      org.opencontainers.image.description="Kubernetes CSI driver whose volumes live in S3 (chunkfs: FUSE over S3 + Redis); one image for the controller, node and mounter roles" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
USER 10001:10001
ENTRYPOINT ["/usr/bin/tini", "--", "chunkfs-csi"]
CMD ["--help"]
