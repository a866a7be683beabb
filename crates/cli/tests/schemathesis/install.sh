#!/usr/bin/env bash
# Installs Schemathesis into /opt/basphere-test/venv (BASPHERE_SCHEMATHESIS_VENV), pinned by
# requirements.txt beside this script. Idempotent, non-interactive; run as root.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${BASPHERE_SCHEMATHESIS_VENV:-/opt/basphere-test/venv}"
want="$(sed -n 's/^schemathesis==//p' "$here/requirements.txt")"
if [ "$("$venv/bin/schemathesis" --version 2>/dev/null | awk '{print $NF}')" = "$want" ]; then
  echo "schemathesis $want: installed in $venv"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! /usr/bin/python3 -m venv --help >/dev/null 2>&1 || ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then
  apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
mkdir -p "$(dirname "$venv")"
/usr/bin/python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --no-input -r "$here/requirements.txt"
echo "schemathesis $("$venv/bin/schemathesis" --version | awk '{print $NF}'): installed in $venv"
