#!/usr/bin/env bash
# Installs the Debian packages nullspace and its tests use. Sourced by
# setup.sh and test.sh; safe to run again (apt-get skips what is installed).
set -euo pipefail

NULLSPACE_APT_PACKAGES=(
  docker-registry   # a real OCI registry for tests and the demo
  skopeo umoci      # peers: tests cross-check our layouts with them
  e2fsprogs         # e2fsck verifies every rootfs we write
  busybox-static    # the embedded demo image's userland
  buildah uidmap    # the daemonless Dockerfile engine (vfs storage, chroot isolation)
  apache2-utils     # htpasswd, for the registry's basic auth
  openssl           # signs registry bearer tokens in tests
  postgresql        # the shared store, started per test run by the harness
  python3-venv      # the published Python SDK runs in a venv for API tests
  ca-certificates
  qemu-system-x86   # the microVM VMM (microvm machine; TCG here, KVM when a probe boots)
  qemu-utils        # qemu-img: a qcow2 overlay per restored sandbox (must match qemu-system's 7.2)
  linux-image-cloud-amd64  # the guest kernel + the virtio modules the initramfs loads
)

missing=()
for p in "${NULLSPACE_APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}" >&2
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "cargo (Rust 1.95+) is required" >&2; exit 1; }

# The published Python SDK, unpatched, drives the API tests; schemathesis
# fuzzes the server from its /openapi.json (4.32.5 verified on Python 3.11).
SDK_VENV=${NULLSPACE_SDK_VENV:-$(dirname "$0")/../target/sdk-venv}
if [ ! -x "$SDK_VENV/bin/python" ] || ! "$SDK_VENV/bin/python" -c 'import nullspace' 2>/dev/null \
  || [ ! -x "$SDK_VENV/bin/schemathesis" ]; then
  python3 -m venv "$SDK_VENV"
  "$SDK_VENV/bin/pip" install -q 'nullspace-sdk==0.1.9' 'schemathesis==4.32.5'
fi
