# The storage-sidecar image: build wheels (pyfuse3 compiles against libfuse3) in a builder stage,
# install them in a slim final stage that has only the FUSE runtime, no compilers.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libfuse3-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends fuse3 libfuse3-3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY container/entrypoint.sh /opt/storage-sidecar/entrypoint.sh
ENV AWS_EC2_METADATA_DISABLED=true
ENTRYPOINT ["storage-sidecar"]
CMD ["run", "--manifest", "/etc/storage-sidecar/manifest.json"]
