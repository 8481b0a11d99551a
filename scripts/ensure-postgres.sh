#!/usr/bin/env bash
# Make sure PostgreSQL server binaries (initdb, pg_ctl) are installed, so that
# tests/postgres_server.py can run a private, throwaway cluster.
#
# Idempotent: if some major version is already under /usr/lib/postgresql/*/bin,
# it only reports where (on stdout) and exits 0. Otherwise it installs Debian's
# `postgresql` package non-interactively, then checks again. It never starts
# Debian's own cluster: Conveyor runs a private cluster (initdb + pg_ctl) in a
# directory of its choosing, on a port of its choosing.
set -euo pipefail

readonly PG_ROOT=/usr/lib/postgresql
readonly CREATECLUSTER_CONF=/etc/postgresql-common/createcluster.conf
readonly POLICY_RC=/usr/sbin/policy-rc.d

log() { printf 'ensure-postgres: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Print the newest bin dir holding both initdb and pg_ctl; fail if there is none.
find_bin_dir() {
    local dir found=""
    # `sort -V` so that 9.6 < 10 < 15 < 17: the last match is the newest.
    while IFS= read -r dir; do
        if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
            found="$dir"
        fi
    done < <(find "$PG_ROOT" -mindepth 2 -maxdepth 2 -type d -name bin 2>/dev/null | sort -V)
    [[ -n "$found" ]] && printf '%s\n' "$found"
}

report() {
    # pg_ctl --version prints e.g. "pg_ctl (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)".
    log "found PostgreSQL $("$1/pg_ctl" --version | awk '{print $3}') in $1"
    printf '%s\n' "$1"
}

apt_install() {
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" </dev/null
}

if dir="$(find_bin_dir)"; then
    report "$dir"
    exit 0
fi

[[ "$(id -u)" -eq 0 ]] || die "PostgreSQL is not installed, and installing it needs root: run 'sudo $0'"
command -v apt-get >/dev/null ||
    die "PostgreSQL is not installed and there is no apt-get: install the PostgreSQL server" \
        "(initdb, pg_ctl) by other means, or point CONVEYOR_PG_BIN at its bin directory"

export DEBIAN_FRONTEND=noninteractive

# Package postinst scripts start services through invoke-rc.d, which asks policy-rc.d
# first; exit code 101 means "action forbidden". Without systemd (containers, CI)
# the init.d script would otherwise really start Debian's cluster on port 5432.
# Only install the policy when none exists, and remove only what we installed.
own_policy=0
cleanup() { if [[ "$own_policy" -eq 1 ]]; then rm -f "$POLICY_RC"; fi; }
trap cleanup EXIT
if [[ ! -e "$POLICY_RC" ]]; then
    printf '#!/bin/sh\n# installed by ensure-postgres.sh for the duration of the install\nexit 101\n' >"$POLICY_RC"
    chmod 755 "$POLICY_RC"
    own_policy=1
fi

# A fresh image has empty package lists; refresh them only then, so re-runs stay fast.
if ! apt-cache show postgresql >/dev/null 2>&1; then
    log "apt does not know 'postgresql' yet: running apt-get update"
    apt-get update -q || die "apt-get update failed (no network or no Debian mirror?)"
fi

# Install postgresql-common first and switch off its automatic `main` cluster before
# the server package arrives (the same two steps as the official postgres image):
# we never use that cluster, and it would only cost disk and a port.
log "installing Debian's postgresql-common package"
apt_install postgresql-common || die "apt-get install postgresql-common failed"
if ! grep -Eqs '^\s*create_main_cluster\s*=\s*false' "$CREATECLUSTER_CONF"; then
    sed -ri 's/^\s*#?\s*(create_main_cluster)\s*=.*$/\1 = false/' "$CREATECLUSTER_CONF" 2>/dev/null || true
    grep -Eqs '^\s*create_main_cluster\s*=\s*false' "$CREATECLUSTER_CONF" ||
        printf 'create_main_cluster = false\n' >>"$CREATECLUSTER_CONF"
fi

log "installing Debian's postgresql package"
apt_install postgresql || die "apt-get install postgresql failed"

dir="$(find_bin_dir)" || die "the postgresql package is installed, but no initdb/pg_ctl is under $PG_ROOT/*/bin"
report "$dir"
