# Fleet's runtime image without a registry: deploy/images/build.sh fills rootfs/ with the
# binaries built on this machine, the shared libraries they load and a non-root user.
FROM scratch
COPY rootfs/ /
# --- runtime: kept identical in deploy/Dockerfile ---
USER 10001:10001
ENV FLEET__HTTP__LISTEN=0.0.0.0:8080 FLEET__LOG__FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["fleetctl", "probe"]
STOPSIGNAL SIGTERM
CMD ["fleet-worker"]
