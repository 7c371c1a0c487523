# syntax=docker/dockerfile:1.7
# The one tally image: every service (`tally ingest|processor|query|migrate|standalone`).
#
#   docker build -t tally .
#
# The build caches cargo's registry and target directory between builds (BuildKit cache
# mounts), so a change to tally's code recompiles tally, not DataFusion and the other
# dependencies. The runtime image is Debian slim with the binary, CA certificates and an
# unprivileged user; services listen on all interfaces (TALLY_LISTEN=0.0.0.0, each on its
# own port: ingest and standalone 8080, query 8081, processor 8082).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tally \
    && install -D -m 0755 target/release/tally /out/tally

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tally \
    && useradd --system --uid 10001 --gid tally --home-dir /var/lib/tally --create-home tally
COPY --from=build /out/tally /usr/local/bin/tally
USER tally:tally
WORKDIR /var/lib/tally
ENV TALLY_LISTEN=0.0.0.0 \
    TALLY_DATA_DIR=/var/lib/tally/data \
    TALLY_LOG_FORMAT=json
VOLUME ["/var/lib/tally"]
EXPOSE 8080 8081 8082
# tini forwards SIGTERM to tally, which drains (TALLY_SHUTDOWN_SECONDS) and exits.
ENTRYPOINT ["/usr/bin/tini", "--", "tally"]
CMD ["standalone"]
HEALTHCHECK --interval=10s --timeout=4s --retries=6 \
    CMD ["tally", "healthcheck", "http://127.0.0.1:8080/readyz"]
