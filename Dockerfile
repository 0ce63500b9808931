# gateway-canary controller image. Policies are mounted at /etc/gateway-canary/policies
# (a ConfigMap); logs are JSON on stdout; /metrics, /healthz, /readyz on port 8080.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY controller ./controller
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin canary
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV GATEWAY_CANARY_POLICIES_DIR=/etc/gateway-canary/policies \
    GATEWAY_CANARY_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
USER 65532
EXPOSE 8080
ENTRYPOINT ["gateway-canary"]
CMD ["run"]
