# Postfix wired to the phishgate sidecar, for the one-host stack (docker-compose.yml) and
# the MTA pod on a cluster. Settings come from the environment, see postfix/entrypoint.sh.
#   docker build -f infra/docker/postfix.Dockerfile -t phishgate/postfix:0.1.0 .
#
# Runs as root on purpose: Postfix's master binds port 25 and starts each daemon with the
# privileges it needs (most as the unprivileged `postfix` user, some chrooted); it is not
# meant to run as a non-root user.
FROM debian:12.12-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        postfix ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --home-dir /home/mailbox --shell /usr/sbin/nologin mailbox
COPY --chmod=0755 infra/docker/postfix/entrypoint.sh /usr/local/sbin/phishgate-postfix
EXPOSE 25 10025
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["postfix", "status"]
ENTRYPOINT ["/usr/local/sbin/phishgate-postfix"]
