#!/usr/bin/env bash
# Installs what the web portal's browser tests need (idempotent, non-interactive, as root):
# Debian's chromium (never a browser download of a test tool's own) and playwright-core from npm
# into crates/web/e2e/node_modules (pinned by e2e/package-lock.json).
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" != 0 ]; then
  echo "web/install-deps: not root; skipping package installs" >&2
  exit 0
fi
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq --no-install-recommends "${need[@]}" fonts-dejavu-core >/dev/null
fi
cd e2e
if [ ! -f node_modules/playwright-core/package.json ]; then
  # playwright-core ships no browser and downloads none: it drives /usr/bin/chromium.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
fi
echo "web/install-deps: chromium $(chromium --version 2>/dev/null | awk '{print $2}'), playwright-core $(node -p "require('./node_modules/playwright-core/package.json').version")"
