# syntax=docker/dockerfile:1
#
# mod-pubsub (Rust). Build:  docker build -t mod-pubsub:<version> .
# Needs BuildKit (the default builder since Docker 23) for the cache mounts below.

############################
# Builder
############################
FROM rust:1-bookworm AS builder

# Toolchain for native dependencies: rdkafka's bundled librdkafka (configure + make, or cmake),
# with ssl / sasl (gssapi) / zlib support.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential \
        cmake \
        perl \
        pkg-config \
        libssl-dev \
        libsasl2-dev \
        zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build
COPY . .

# The registry and target directory are cache mounts, so rebuilds only recompile what changed.
# The binary is copied out of the cache mount so that the next stage can see it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin mod-pubsub \
    && install -D -m 0755 target/release/mod-pubsub /out/mod-pubsub

############################
# Runtime
############################
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        curl \
        libssl3 \
        libsasl2-2 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 1001 pubsub \
    && useradd --system --uid 1001 --gid 1001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pubsub

COPY --from=builder /out/mod-pubsub /usr/local/bin/mod-pubsub

# Same defaults as the Java image (folio-org/mod-pubsub Dockerfile); override at deploy time.
ENV HTTP_PORT=8081 \
    KAFKA_HOST=10.0.2.15 \
    KAFKA_PORT=9092 \
    OKAPI_URL=http://10.0.2.15:9130

USER 1001:1001
EXPOSE 8081

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${HTTP_PORT}/admin/health" || exit 1

ENTRYPOINT ["/usr/local/bin/mod-pubsub"]
CMD ["serve"]
