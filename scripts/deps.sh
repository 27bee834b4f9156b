#!/usr/bin/env bash
# Installs the Debian packages nullspace and its tests use, then checks that
# every external program the project calls exists. Run by setup.sh and
# test.sh; safe to run again.
#
# The whole list goes to one `apt-get install` every run: cheap when all is
# installed, and apt resolves conflicts across the list together. (Machines
# of this kind ship backports' qemu-utils 10; installing Debian 12's
# qemu-system-x86 7.2 on its own removes it, and qemu-img with it.)
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

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
  ca-certificates curl
  git               # the git tests, and the git a machine test's template carries
  openssh-client    # ssh and ssh-keygen: the SSH access tests and benchmark
  cpio              # the guest initramfs is packed with it
  util-linux        # unshare (engine builds without network), runuser
  debootstrap       # the realistic Debian image of the VM test and benchmarks
  linux-image-cloud-amd64  # the guest kernel + the virtio modules the initramfs loads
  chromium fonts-dejavu-core  # the browser test renders a machine's preview URL
  iproute2 nftables # a network namespace per machine, its egress policy as an nft table
  # The SBOM tests' fixture databases, written by the real package managers
  # (crates/nullspace-sbom/tests/fixtures/make-rootfs.sh), and their schema check.
  rpm db5.3-util pacman-package-manager libarchive-tools python3-jsonschema
  syslinux syslinux-common mtools dosfstools  # exported disks: a FAT boot partition made and made bootable without a mount
)
# The VMM and qemu-img come from bookworm-backports (QEMU 10): the same
# version for both, and the one the machine image already carries for
# qemu-utils. Fast restore wants QEMU 9+ too.
QEMU_PACKAGES=(qemu-system-x86 qemu-utils)

# Debian's mirror as the machine's apt sources name it (one-line or deb822).
debian_mirror() {
  local m
  m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | awk '$1=="deb" { for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' \
      | grep -v -e security -e backports | grep -i debian | head -n1 || true)
  if [ -z "$m" ]; then
    m=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm( |\n|$)/ && !/security/ {
                 if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { s=substr($0,RSTART,RLENGTH); sub(/URIs:[ \t]*/,"",s); print s } }' \
        | grep -i debian | head -n1 || true)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

BACKPORTS=/etc/apt/sources.list.d/nullspace-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "adding bookworm-backports from $(debian_mirror)" >&2
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$(debian_mirror)" | $SUDO tee "$BACKPORTS" >/dev/null
fi

# `apt-get update` only when the lists are older than a day or backports is
# not in them yet; the install itself runs every time.
stamp=/var/lib/apt/periodic/nullspace-update-stamp
if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440 2>/dev/null)" ] \
   || ! grep -q bookworm-backports <<<"$(apt-cache policy 2>/dev/null)"; then
  $SUDO apt-get update -q
  $SUDO mkdir -p "$(dirname "$stamp")" && $SUDO touch "$stamp"
fi
# Pin QEMU and the firmware it needs to backports, so apt takes their
# matching dependencies (qemu-system-common/-data, seabios) from there too.
PIN=/etc/apt/preferences.d/nullspace-qemu
printf 'Package: qemu-system-* qemu-utils qemu-block-extra seabios ipxe-qemu\nPin: release n=bookworm-backports\nPin-Priority: 990\n' \
  | $SUDO tee "$PIN" >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
  "${NULLSPACE_APT_PACKAGES[@]}" "${QEMU_PACKAGES[@]}" \
  -o Dpkg::Options::=--force-confold >/tmp/nullspace-apt.log 2>&1 \
  || { tail -n 30 /tmp/nullspace-apt.log >&2; echo "error: apt-get install failed (log: /tmp/nullspace-apt.log)" >&2; exit 1; }

# cargo-fuzz, pinned, for CI's fuzz step (scripts/fuzz-smoke.sh).
if command -v cargo >/dev/null 2>&1; then bash "$(dirname "$0")/fuzz-smoke.sh" --install-only; fi

# Every program the project, its tests and its benchmarks call. One line
# names whatever is missing.
REQUIRED_PROGRAMS=(
  qemu-system-x86_64 qemu-img buildah skopeo umoci docker-registry e2fsck debugfs
  mkfs.ext4 htpasswd openssl cpio unshare runuser busybox curl debootstrap python3
  cargo cargo-fuzz git ldd chromium ssh ssh-keygen ip nft
  dpkg-deb rpm rpmbuild db5.3_load pacman bsdtar
  syslinux mcopy mkfs.vfat
)
missing=()
for p in "${REQUIRED_PROGRAMS[@]}"; do command -v "$p" >/dev/null 2>&1 || missing+=("$p"); done
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
for p in initdb pg_ctl postgres pg_dump; do [ -x "$pgbin/$p" ] || missing+=("$p (postgresql)"); done
ls /boot/vmlinuz-*cloud-amd64 >/dev/null 2>&1 || missing+=("/boot/vmlinuz-*-cloud-amd64 (linux-image-cloud-amd64)")
[ -f /usr/lib/syslinux/mbr/mbr.bin ] || missing+=("/usr/lib/syslinux/mbr/mbr.bin (syslinux-common)")
if ((${#missing[@]})); then
  echo "error: set-up finished but these programs are missing: ${missing[*]}" >&2
  exit 1
fi
qemu_sys=$(qemu-system-x86_64 --version | head -n1 | grep -o 'version [0-9.]*' | cut -d' ' -f2)
qemu_img=$(qemu-img --version | head -n1 | grep -o 'version [0-9.]*' | cut -d' ' -f2)
if [ "${qemu_sys%%.*}" != "${qemu_img%%.*}" ]; then
  echo "error: qemu-system-x86_64 $qemu_sys and qemu-img $qemu_img differ in major version" >&2
  exit 1
fi

# The published Python SDK, unpatched, drives the API tests: 0.1.9
# (`Sandbox`) and 1.0.3 (`Machine`, today's PyPI release) each in a venv of
# its own. schemathesis fuzzes the server from its /openapi.json.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
sdk_venv() { # sdk_venv DIR VERSION EXTRA...
  local dir=$1 ver=$2; shift 2
  if [ ! -x "$dir/bin/python" ] \
     || [ "$("$dir/bin/python" -c 'import importlib.metadata as m; print(m.version("nullspace-sdk"))' 2>/dev/null)" != "$ver" ]; then
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q "nullspace-sdk==$ver" "$@"
  fi
}
sdk_venv "${NULLSPACE_SDK_VENV:-$ROOT/target/sdk-venv}" 0.1.9 'schemathesis==4.32.5'
sdk_venv "${NULLSPACE_SDK1_VENV:-$ROOT/target/sdk1-venv}" 1.0.3

# E2B's published Python SDK, unpatched, drives the E2B dialect's suite
# (crates/nullspace/tests/e2b_sdk.rs) from its own venv, pinned by the
# suite's requirements file; made again when the file changes.
E2B_VENV="${NULLSPACE_E2B_VENV:-$ROOT/target/e2b-venv}"
E2B_REQ="$ROOT/crates/nullspace/tests/e2b/requirements.txt"
if [ ! -x "$E2B_VENV/bin/python" ] || ! cmp -s "$E2B_REQ" "$E2B_VENV/requirements.txt"; then
  rm -rf "$E2B_VENV"
  python3 -m venv "$E2B_VENV"
  "$E2B_VENV/bin/pip" install -q -r "$E2B_REQ"
  cp "$E2B_REQ" "$E2B_VENV/requirements.txt"
fi

# The supply-chain checks test.sh runs (deny.toml; unused dependencies),
# pinned, built from crates.io when missing or another version: in one
# `cargo install` with one target directory (they share most crates), as
# debug builds without debug info. From scratch on this machine's 2 cores
# that took 124 s of CPU for both, against 358 s as two release builds;
# their checks still take seconds (README.md, "Supply chain").
SUPPLY_TOOLS=(cargo-deny@0.20.2 cargo-machete@0.9.2)
tools_missing=()
for t in "${SUPPLY_TOOLS[@]}"; do
  name=${t%@*}
  # The last word of `--version` (cargo-deny prints its name first).
  have=$(cargo "${name#cargo-}" --version 2>/dev/null | awk '{print $NF}' || true)
  [ "$have" = "${t#*@}" ] || tools_missing+=("$t")
done
if ((${#tools_missing[@]})); then
  echo "installing ${tools_missing[*]}" >&2
  tools_target=$(mktemp -d)
  CARGO_PROFILE_DEV_DEBUG=0 cargo install -q --locked --debug \
    --target-dir "$tools_target" "${tools_missing[@]}"
  rm -rf "$tools_target"
fi
