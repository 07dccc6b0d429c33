# Redis for Fleet's compose stack, without a registry: this machine's redis-server and
# redis-cli with their shared libraries (deploy/images/build.sh), run as a non-root user.
# Its settings (deploy/redis/fleet.conf) and data directory come from the command in
# deploy/docker-compose.yml.
FROM scratch
COPY rootfs/ /
COPY --chown=999:999 data/ /data/
USER 999:999
WORKDIR /data
EXPOSE 6379
HEALTHCHECK --interval=2s --timeout=2s --start-period=5s --retries=5 CMD ["redis-cli", "ping"]
CMD ["redis-server", "--appendonly", "yes", "--dir", "/data"]
