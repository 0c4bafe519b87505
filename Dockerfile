# syntax=docker/dockerfile:1
# One image for every Python component of medmesh (services and the MQTT adapter).
# The component is chosen by the command: `python -m services.organization` (default),
# `python -m services.device`, `python -m mqtt_adapter`.
#
#   docker build -t medmesh:dev .
#   docker run --rm medmesh:dev services.device
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------
# build: resolve the locked dependencies and generate code from protos/.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ARG UV_VERSION=0.13.9
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3

RUN pip install "uv==${UV_VERSION}"

WORKDIR /app
COPY pyproject.toml uv.lock ./

# The runtime environment, exactly as locked, without dev dependencies: this is what ships.
RUN --mount=type=cache,target=/root/.cache/uv \
    UV_PROJECT_ENVIRONMENT=/app/.venv uv sync --frozen --no-dev --no-install-project

# A second environment with the dev group, only for code generation:
# tools/protogen.py needs grpcio-tools, a dev dependency. It never leaves this stage.
# hadolint ignore=DL3059
RUN --mount=type=cache,target=/root/.cache/uv \
    UV_PROJECT_ENVIRONMENT=/opt/buildenv uv sync --frozen --no-install-project

COPY medmesh/ medmesh/
COPY services/ services/
COPY mqtt_adapter/ mqtt_adapter/
COPY protos/ protos/
COPY tools/ tools/

# -> build/gen/python (messages, stubs) and build/proto/medmesh.binpb (Envoy's descriptor set).
RUN /opt/buildenv/bin/python tools/protogen.py

# ---------------------------------------------------------------------------
# runtime: the runtime venv, the generated code and the sources; no build tools.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 medmesh \
 && useradd --system --uid 10001 --gid medmesh --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin medmesh

ENV VIRTUAL_ENV=/app/.venv \
    PATH=/app/.venv/bin:$PATH \
    PYTHONPATH=/app/build/gen/python:/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
# Same base image and same path as in the build stage, so the venv's interpreter links hold.
COPY --from=build /app/.venv /app/.venv
COPY --from=build /app/build/gen/python /app/build/gen/python
# The descriptor set the gateway's ConfigMap `gateway-descriptors` is made from, versioned with
# the image: docker run --rm --entrypoint cat medmesh:dev /app/build/proto/medmesh.binpb
COPY --from=build /app/build/proto/medmesh.binpb /app/build/proto/medmesh.binpb
COPY --from=build /app/medmesh /app/medmesh
COPY --from=build /app/services /app/services
COPY --from=build /app/mqtt_adapter /app/mqtt_adapter

# Files stay owned by root: the app only reads them (the pods also mount / read-only).
USER 10001:10001

# gRPC services listen on 50051 (organization), 50052 (device); the adapter on 8883 (MQTT/TLS)
# and 50060 (gRPC health). Kubernetes sets MEDMESH_GRPC_HOST=0.0.0.0; the code defaults to loopback.
EXPOSE 50051 50052 50060 8883

ENTRYPOINT ["python", "-m"]
CMD ["services.organization"]
