# gateway-canary controller image.
#   Policies are mounted at /etc/gateway-canary/policies (a ConfigMap, hot-reloaded); logs are JSON
#   on stdout; /metrics, /healthz and /readyz on port 8080; runs as the numeric user 65532.
# Two stages: wheels for the package and every dependency are built in the first, and the last
# installs from those wheels alone (no compiler, no build tools, no network) and keeps nothing else.
# tests/test_container.py performs these same steps (no Docker engine on the build machines) and
# lints this file with hadolint.
# The base is pinned by version; pin it by digest too in a registry you control
# (docker buildx imagetools inspect python:3.11.11-slim-bookworm).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY controller ./controller
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="gateway-canary" \
      org.opencontainers.image.description="Metric-gated traffic migration between two ingress gateways sharing one Alibaba Cloud CLB" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/gateway-canary/gateway-canary"
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "gateway-canary==${VERSION}"
ENV GATEWAY_CANARY_POLICIES_DIR=/etc/gateway-canary/policies \
    GATEWAY_CANARY_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["gateway-canary"]
CMD ["run"]
