# The gateway's container image: Debian bookworm's Python 3.11, the package in a venv,
# a non-root numeric user, nothing written at run time (read-only root filesystem works).
#
#   docker build -t gateway .
#   docker run --read-only -p 4180:4180 -v "$PWD/config:/etc/gateway:ro" gateway
#
# The config is read from $GATEWAY_CONFIG (default /etc/gateway/gateway.yaml); in a container
# it must say `server.host: 0.0.0.0`. See docs/deployment.md.

# Debian's Python, shared by both stages (one apt layer, reused from the build cache).
FROM debian:bookworm-slim AS python
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log

FROM python AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/gateway
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
# Binary wheels (there is no compiler here); pip compiles the bytecode now, since the root
# filesystem may be read-only at run time. pip and setuptools are not needed afterwards.
RUN /opt/gateway/bin/pip install --no-cache-dir --disable-pip-version-check --prefer-binary ".[speed]" \
 && /opt/gateway/bin/pip uninstall -y -q pip setuptools

FROM python
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.description="OpenID Connect authentication gateway (reverse proxy with server-side sessions)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/deployment.md" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
COPY --from=build /opt/gateway /opt/gateway
ENV PATH=/opt/gateway/bin:$PATH \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /
EXPOSE 4180
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["gateway", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["run"]
