#!/bin/bash
# The healthcheck of docker-compose.yml calls apache/kafka's kafka-broker-api-versions.sh. The jars
# the project fetches carry no kafka-tools, so this stand-in answers the same question more simply:
# does the broker accept connections on the --bootstrap-server address? Exit 0 if so.
set -euo pipefail
server=""
while (($#)); do
    case "$1" in
        --bootstrap-server) server="$2"; shift 2 ;;
        *) shift ;;
    esac
done
[[ -n "$server" ]] || { echo "usage: $0 --bootstrap-server HOST:PORT" >&2; exit 2; }
first="${server%%,*}"
exec 3<>"/dev/tcp/${first%:*}/${first##*:}"
