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

source "$(dirname "${BASH_SOURCE[0]}")/debian-packages.sh"
require_apt Chromium "install a Chromium at $CHROMIUM by other means"
refresh_package_lists_for chromium
# The browser alone: headless is all the tests need (no desktop integration, no extra fonts beyond the
# package's own dependencies).
apt_install chromium

found || die "the chromium package is installed, but $CHROMIUM does not run"
report
