#!/usr/bin/env bash
# Installs the system packages the test suite needs (Debian/Ubuntu, apt).
#
# Idempotent and quick when everything is there: it asks dpkg first and runs
# apt-get (and `apt-get update`, only if the package lists cannot offer a
# missing package) only for what is missing.  `make test` calls it.
#
# To add a package, add one line to PACKAGES below: the Debian package name,
# then the command that shows it is present on a system without dpkg.
set -euo pipefail

# package            command (fallback check where there is no dpkg)
PACKAGES=(
    "openssh-server  /usr/sbin/sshd"   # tests/tools/test_bootstrap_ssh.py: a real sshd on 127.0.0.1
    "openssh-client  ssh"              # tools/bootstrap.py runs the system ssh client
    "python3         /usr/bin/python3" # the python3 the ssh test user gets on the remote side
    "python3-venv    /usr/bin/python3" # ... and its venv/ensurepip (bootstrap makes a venv there)
    "chromium        chromium"         # tests/tools/test_monitor_browser.py: headless browser loads the monitor
    "chromium-driver chromedriver"     # ... driven through chromedriver's W3C WebDriver HTTP API
)

say() { printf 'test-deps: %s\n' "$*" >&2; }

missing=()
for entry in "${PACKAGES[@]}"; do
    read -r pkg cmd <<<"$entry"
    if command -v dpkg-query >/dev/null 2>&1; then
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        [[ $status == "install ok installed" ]] || missing+=("$pkg")
    elif ! command -v "$cmd" >/dev/null 2>&1; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    say "missing ${missing[*]}, and there is no apt-get here: install them with this system's package manager"
    exit 1
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        say "missing ${missing[*]}: run this script as root (or with passwordless sudo)"
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive

# Refresh the package lists only when one of the missing packages has no candidate.
need_update=0
for pkg in "${missing[@]}"; do
    candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [[ -z $candidate || $candidate == "(none)" ]]; then
        need_update=1
        break
    fi
done

# Installing openssh-server must not start a system sshd on port 22: keep
# services from starting during the install (what Docker images already do).
policy=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# written by snsbus scripts/test-deps.sh for the duration of an install\nexit 101\n' \
        | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    made_policy=1
fi
cleanup() { if ((made_policy)); then "${SUDO[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

say "installing ${missing[*]}"
if ((need_update)); then
    "${SUDO[@]}" apt-get update -q
fi
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
