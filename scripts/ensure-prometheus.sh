#!/usr/bin/env bash
# Make sure Prometheus (the server and promtool) is installed, so that the metrics tests can run a
# private, throwaway Prometheus that scrapes a test stack, and check the alert rules with promtool.
#
# Idempotent: if both binaries are on the PATH, it only reports where (on stdout) and exits 0.
# Otherwise it installs Debian's `prometheus` package non-interactively, then checks again. It never
# starts Debian's own Prometheus service: the tests run their own, in a directory and on a port of
# their choosing.
set -euo pipefail

readonly POLICY_RC=/usr/sbin/policy-rc.d

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

[[ "$(id -u)" -eq 0 ]] || die "Prometheus is not installed, and installing it needs root: run 'sudo $0'"
command -v apt-get >/dev/null ||
    die "Prometheus is not installed and there is no apt-get: install prometheus and promtool by other means"

export DEBIAN_FRONTEND=noninteractive

# Package postinst scripts start services through invoke-rc.d, which asks policy-rc.d first; exit
# code 101 means "action forbidden". Without it, Debian's Prometheus would start on port 9090 and
# scrape nothing of ours. Only install the policy when none exists, and remove only what we installed.
own_policy=0
cleanup() { if [[ "$own_policy" -eq 1 ]]; then rm -f "$POLICY_RC"; fi; }
trap cleanup EXIT
if [[ ! -e "$POLICY_RC" ]]; then
    printf '#!/bin/sh\n# installed by ensure-prometheus.sh for the duration of the install\nexit 101\n' >"$POLICY_RC"
    chmod 755 "$POLICY_RC"
    own_policy=1
fi

# A fresh image has empty package lists; refresh them only then, so re-runs stay fast.
if ! apt-cache show prometheus >/dev/null 2>&1; then
    log "apt does not know 'prometheus' yet: running apt-get update"
    apt-get update -q || die "apt-get update failed (no network or no Debian mirror?)"
fi

# --no-install-recommends: the server and promtool only, not the node exporter and the web console
# libraries that Debian recommends.
log "installing Debian's prometheus package"
apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold prometheus </dev/null ||
    die "apt-get install prometheus failed"

found || die "the prometheus package is installed, but prometheus or promtool is not on the PATH"
report
