# The storage-sidecar image: build wheels (pyfuse3 compiles against libfuse3) in a builder stage,
# install them in a final stage that has only the FUSE runtime, no compilers.
#
# BASE: the official Python slim image by default; container/build.sh passes a local base made
# from Debian's own packages (mmdebstrap) when no container registry answers. A Debian base has
# Python in /usr/bin and no pip: the stages below make a venv in /opt/venv either way.
ARG BASE=docker.io/library/python:3.11-slim
FROM ${BASE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libfuse3-dev pkg-config python3-venv python3-dev \
    || apt-get install -y --no-install-recommends gcc libc6-dev libfuse3-dev pkg-config; rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip wheel
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY sidecar ./sidecar
RUN /opt/venv/bin/pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${BASE}
RUN apt-get update && apt-get install -y --no-install-recommends fuse3 libfuse3-3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && (python3 -m venv --help >/dev/null 2>&1 || true)
COPY --from=build /opt/venv /opt/venv
COPY --from=build /wheels /wheels
RUN /opt/venv/bin/pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && ln -s /opt/venv/bin/storage-sidecar /usr/local/bin/storage-sidecar \
    && (getent group sidecar >/dev/null || groupadd --gid 10001 sidecar) \
    && (getent passwd sidecar >/dev/null || useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sidecar)
COPY container/entrypoint.sh /opt/storage-sidecar/entrypoint.sh
ENV AWS_EC2_METADATA_DISABLED=true PATH=/opt/venv/bin:$PATH
# Root by default: mounting with FUSE needs CAP_SYS_ADMIN in the pod. With a mount helper
# (fd passing), run it as `sidecar` (uid 10001) with no capabilities: `--user 10001`.
ENTRYPOINT ["storage-sidecar"]
CMD ["run", "--manifest", "/etc/storage-sidecar/manifest.json"]
