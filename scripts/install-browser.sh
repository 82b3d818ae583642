#!/usr/bin/env bash
# Installs the headless browser that the HTML-report tests drive: Debian's chromium, used through playwright's
# Python API with executable_path=/usr/bin/chromium (playwright's own browser download is never used).
# Idempotent. Installs only as root where apt-get exists (Debian/Ubuntu); anywhere else it prints one line saying
# the browser tests will be skipped. Always exits 0.
set -u
BROWSER=/usr/bin/chromium
PACKAGES="chromium fonts-liberation fonts-dejavu-core"
SKIPPED="the browser tests of the HTML report will be skipped"
if [ -x "$BROWSER" ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: $BROWSER is missing and installing it needs root and apt-get; $SKIPPED"
    exit 0
fi
# shellcheck disable=SC2086  # the package list is meant to split
if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES; } \
    >/dev/null 2>&1 && [ -x "$BROWSER" ]; then
    exit 0
fi
echo "install-browser: apt-get could not install chromium; $SKIPPED"
exit 0
