#!/bin/bash
# As apache/kafka does: every KAFKA_<NAME> variable becomes a server.properties key (`_` -> `.`,
# `__` -> `-`, `___` -> `_`, lowercased), CLUSTER_ID formats the log dirs once, then the broker
# replaces this shell (so it receives SIGTERM itself).
set -euo pipefail

readonly CONFIG=/opt/kafka/config/server.properties
# The JVM options apache/kafka reads from the environment: not broker properties.
readonly NOT_PROPERTIES=" KAFKA_HEAP_OPTS KAFKA_OPTS KAFKA_JVM_PERFORMANCE_OPTS KAFKA_LOG4J_OPTS KAFKA_JMX_OPTS KAFKA_GC_LOG_OPTS KAFKA_DEBUG KAFKA_HOME KAFKA_VERSION "

: >"$CONFIG"
while IFS='=' read -r name value; do
    [[ "$name" == KAFKA_* && "$NOT_PROPERTIES" != *" $name "* ]] || continue
    key="${name#KAFKA_}"
    key="${key,,}"
    key="${key//___/$'\x01'}"
    key="${key//__/-}"
    key="${key//_/.}"
    key="${key//$'\x01'/_}"
    printf '%s=%s\n' "$key" "$value" >>"$CONFIG"
done < <(env)

: "${CLUSTER_ID:?set CLUSTER_ID (a base64 UUID, as for apache/kafka)}"
classpath='/opt/kafka/libs/*'
log4j="-Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties"
java -cp "$classpath" "$log4j" kafka.tools.StorageTool format -g -t "$CLUSTER_ID" -c "$CONFIG" >/dev/null
# shellcheck disable=SC2086 # the *_OPTS are lists of options, as in kafka-run-class.sh
exec java ${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m} -XX:+UseG1GC -Djava.awt.headless=true "$log4j" \
    ${KAFKA_OPTS:-} -cp "$classpath" kafka.Kafka "$CONFIG"
