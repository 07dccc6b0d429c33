# The tansu broker (a Kafka-API broker, one static binary) for Fleet's compose stack, without a
# registry. In-memory storage: a development broker; point Fleet at your Kafka in production.
FROM scratch
COPY rootfs/ /
USER 10002:10002
EXPOSE 9092
ENTRYPOINT ["/usr/local/bin/tansu"]
CMD ["broker", "--listener-url", "tcp://0.0.0.0:9092", "--advertised-listener-url", "tcp://broker:9092", "--storage-engine", "memory://tansu/"]
