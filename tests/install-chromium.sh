#!/usr/bin/env bash
# Debian's Chromium for the web-page tests (browser downloads from pip need internet). Idempotent; uses sudo
# only when not root. Run by the README's setup command and by .ci/run.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
