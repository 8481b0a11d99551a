# Sourced by the scripts/ensure-*.sh installers: Debian packages installed non-interactively, quickly
# on a re-run, and without starting the services they ship (the tests run private servers of their
# own, in directories and on ports of their choosing). The caller defines log() and die() first.

# Not readonly: ensure-docker.sh sources this file once per thing it installs.
POLICY_RC=/usr/sbin/policy-rc.d

# Root and apt-get, or say what to do instead. $1: what is missing; $2: how to get it without apt.
require_apt() {
    [[ "$(id -u)" -eq 0 ]] || die "$1 is not installed, and installing it needs root: run 'sudo $0'"
    command -v apt-get >/dev/null || die "$1 is not installed and there is no apt-get: $2"
    export DEBIAN_FRONTEND=noninteractive
}

# Package postinst scripts start services through invoke-rc.d, which asks policy-rc.d first; exit
# code 101 means "action forbidden". Without it (no systemd: containers, CI) Debian's PostgreSQL
# cluster would start on 5432 and its Prometheus on 9090. Only install the policy when none exists,
# and remove only what we installed, when the script exits.
forbid_service_starts() {
    if [[ ! -e "$POLICY_RC" ]]; then
        printf '#!/bin/sh\n# installed by %s for the duration of the install\nexit 101\n' "$(basename "$0")" >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        trap 'rm -f "$POLICY_RC"' EXIT
    fi
}

# A fresh image has empty package lists; refresh them only then, so re-runs stay fast.
refresh_package_lists_for() {
    if ! apt-cache show "$1" >/dev/null 2>&1; then
        log "apt does not know '$1' yet: running apt-get update"
        apt-get update -q || die "apt-get update failed (no network or no Debian mirror?)"
    fi
}

# --no-install-recommends: what the tests need, not what Debian recommends beside it.
apt_install() {
    log "installing Debian's $* package(s)"
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" </dev/null ||
        die "apt-get install $* failed"
}
