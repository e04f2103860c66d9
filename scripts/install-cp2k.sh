#!/usr/bin/env bash
# Install CP2K from Debian's packages (cp2k, cp2k_shell) unless it is there already.
# The ase adapter's tests run it for real on a small periodic water box.
set -euo pipefail
if command -v cp2k_shell >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo -n)
else
  echo "error: CP2K is not installed and this user cannot run apt-get; install the Debian package cp2k" >&2
  exit 1
fi
echo "installing CP2K (Debian package cp2k) ..." >&2
"${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -qq cp2k >/dev/null
command -v cp2k_shell >/dev/null
