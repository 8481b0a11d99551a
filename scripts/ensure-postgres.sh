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

if dir="$(find_bin_dir)"; then
    report "$dir"
    exit 0
fi

source "$(dirname "${BASH_SOURCE[0]}")/debian-packages.sh"
require_apt PostgreSQL "install the PostgreSQL server (initdb, pg_ctl) by other means, or point CONVEYOR_PG_BIN at its bin directory"
forbid_service_starts  # the init.d script would otherwise really start Debian's cluster on port 5432
refresh_package_lists_for postgresql

# Install postgresql-common first and switch off its automatic `main` cluster before
# the server package arrives (the same two steps as the official postgres image):
# we never use that cluster, and it would only cost disk and a port.
apt_install postgresql-common
if ! grep -Eqs '^\s*create_main_cluster\s*=\s*false' "$CREATECLUSTER_CONF"; then
    sed -ri 's/^\s*#?\s*(create_main_cluster)\s*=.*$/\1 = false/' "$CREATECLUSTER_CONF" 2>/dev/null || true
    grep -Eqs '^\s*create_main_cluster\s*=\s*false' "$CREATECLUSTER_CONF" ||
        printf 'create_main_cluster = false\n' >>"$CREATECLUSTER_CONF"
fi

apt_install postgresql

dir="$(find_bin_dir)" || die "the postgresql package is installed, but no initdb/pg_ctl is under $PG_ROOT/*/bin"
report "$dir"
