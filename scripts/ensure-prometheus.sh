#!/usr/bin/env bash
# Make sure Prometheus (the server and promtool) is installed, so that the metrics tests can run a
# private, throwaway Prometheus that scrapes a test stack, and check the alert rules with promtool.
#
# Idempotent: if both binaries are on the PATH, it only reports where (on stdout) and exits 0.
# Otherwise it installs Debian's `prometheus` package non-interactively, then checks again. It never
# starts Debian's own Prometheus service: the tests run their own, in a directory and on a port of
# their choosing.
set -euo pipefail

log() { printf 'ensure-prometheus: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

found() { command -v prometheus >/dev/null && command -v promtool >/dev/null; }

report() {
    # prometheus --version prints e.g. "prometheus, version 2.42.0+ds (branch: debian/sid, ...)".
    log "found Prometheus $(prometheus --version 2>&1 | awk 'NR == 1 {print $3}') at $(command -v prometheus)"
    command -v prometheus
}

if found; then
    report
    exit 0
fi

source "$(dirname "${BASH_SOURCE[0]}")/debian-packages.sh"
require_apt Prometheus "install prometheus and promtool by other means"
forbid_service_starts  # Debian's Prometheus would start on port 9090 and scrape nothing of ours
refresh_package_lists_for prometheus
# The server and promtool only, not the node exporter and the web console libraries Debian recommends.
apt_install prometheus

found || die "the prometheus package is installed, but prometheus or promtool is not on the PATH"
report
