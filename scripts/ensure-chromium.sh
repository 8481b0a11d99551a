#!/usr/bin/env bash
# Make sure Debian's Chromium is installed, so that the dashboard's tests (tests/test_dashboard.py) can
# drive a real browser with Playwright for Python, launched on /usr/bin/chromium: Playwright never
# downloads a browser of its own.
#
# Idempotent: if /usr/bin/chromium runs, it only reports its version (on stderr) and its path (on
# stdout) and exits 0. Otherwise it installs Debian's `chromium` package non-interactively, then
# checks again.
set -euo pipefail

readonly CHROMIUM=/usr/bin/chromium

log() { printf 'ensure-chromium: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

found() { [[ -x "$CHROMIUM" ]] && "$CHROMIUM" --version >/dev/null 2>&1; }

report() {
    # chromium --version prints e.g. "Chromium 150.0.7871.100 built on Debian GNU/Linux 12 (bookworm)".
    log "found $("$CHROMIUM" --version 2>/dev/null | awk '{print $1, $2}') at $CHROMIUM"
    printf '%s\n' "$CHROMIUM"
}

if found; then
    report
    exit 0
fi

[[ "$(id -u)" -eq 0 ]] || die "Chromium is not installed, and installing it needs root: run 'sudo $0'"
command -v apt-get >/dev/null ||
    die "Chromium is not installed and there is no apt-get: install a Chromium at $CHROMIUM by other means"

export DEBIAN_FRONTEND=noninteractive

# A fresh image has empty package lists; refresh them only then, so re-runs stay fast.
if ! apt-cache show chromium >/dev/null 2>&1; then
    log "apt does not know 'chromium' yet: running apt-get update"
    apt-get update -q || die "apt-get update failed (no network or no Debian mirror?)"
fi

# --no-install-recommends: the browser alone, headless is all the tests need (no desktop integration,
# no extra fonts beyond the package's own dependencies).
log "installing Debian's chromium package"
apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold chromium </dev/null ||
    die "apt-get install chromium failed"

found || die "the chromium package is installed, but $CHROMIUM does not run"
report
