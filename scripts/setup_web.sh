#!/usr/bin/env bash
# The browser side (web/): its npm packages, pinned by web/package-lock.json, and, as root on Debian, the system's
# Chromium for the browser tests (playwright-core drives it; it never downloads a browser). Idempotent.
# Exit 0 when both are there; otherwise say what is missing and exit 3 (the browser tests then skip, or fail
# where BITFIT_REQUIRE_BROWSER=1, as in CI).
set -uo pipefail
cd "$(dirname "$0")/.."
# Debian 12's chromium when this was written; a security update replaces it in the archive, so an older pin
# falls back to the archive's current build, with a line saying so (tests/test_web.py prints the version it ran)
CHROMIUM_VERSION="150.0.7871.100-1~deb12u1"
missing=()
if command -v npm >/dev/null 2>&1; then
  if [ ! -f web/node_modules/.package-lock.json ] || [ web/package-lock.json -nt web/node_modules/.package-lock.json ]; then
    npm ci --prefix web --no-audit --no-fund --loglevel=error >/dev/null || missing+=("npm packages (npm ci --prefix web failed)")
  fi
else
  missing+=("Node.js and npm (apt-get install nodejs npm)")
fi
if [ -z "${CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q --no-install-recommends "chromium=${CHROMIUM_VERSION}" >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "chromium=${CHROMIUM_VERSION}" >/dev/null 2>&1; } ||
      { echo "setup_web: chromium ${CHROMIUM_VERSION} is no longer in the archive; installing its current build" >&2
        apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; } ||
      missing+=("Chromium (apt-get install chromium failed)")
  else
    missing+=("Chromium (as root: apt-get install chromium; or set CHROMIUM to a Chromium binary)")
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  printf 'setup_web: the browser tests cannot run here: missing %s\n' "${missing[*]}" >&2
  exit 3
fi
exit 0
