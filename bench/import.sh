#!/usr/bin/env bash
# Benchmark: `nullspace image import` against skopeo copy + umoci unpack +
# mkfs.ext4 -d, and against the decompression floor (gzip -dc of every layer).
#
# It builds (once, cached under $BENCH_DIR) a realistic 4-layer image with umoci:
#   1. Debian bookworm minbase (debootstrap)
#   2. python3 + git (apt-get in a chroot), apt lists cleaned
#   3. a large site-packages tree (numpy, pandas, requests, flask and deps, from PyPI)
#   4. deletions and replacements: removed directories, dir->file, file->dir,
#      dir->symlink, hard links (also across layers), symlinks, mode/owner changes
# serves it from a local docker-registry on 127.0.0.1, and times every contender
# in the same run. It prints a table, the ratios and PASS/MISS against targets.
#
# It exits non-zero only when a step fails, never for a missed target.
#
# Usage: bench/import.sh [--reps N] [--rebuild] [--build-only] [--keep]
# Env:   NULLSPACE_BIN  nullspace binary (default: cargo build --release -p nullspace)
#        BENCH_DIR      image cache and scratch space (default /var/tmp/nullspace-bench)
#        BENCH_MIRROR   Debian mirror for debootstrap (default: from the apt sources)
#
# Must run as root (debootstrap, chroot, umoci repack of root-owned files).

set -euo pipefail

REPS=3
REBUILD=0
BUILD_ONLY=0
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) REPS="$2"; shift 2 ;;
        --reps=*) REPS="${1#*=}"; shift ;;
        --rebuild) REBUILD=1; shift ;;
        --build-only) BUILD_ONLY=1; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
case "$REPS" in ''|*[!0-9]*|0) echo "--reps needs a positive integer" >&2; exit 2 ;; esac

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-/var/tmp/nullspace-bench}"
# Bump when the image recipe changes: a cached image of another version is rebuilt.
IMAGE_VERSION=1
LAYOUT="$BENCH_DIR/oci-app"
TAG=app
REPO_REF=bench/app:1

# Pinned so that a rebuild gives the same tree. cp311: bookworm's python3 is 3.11.
PY_PACKAGES=(numpy==1.26.4 pandas==2.2.2 requests==2.32.3 flask==3.0.3)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and umoci need it)"

# ---------------------------------------------------------------- prerequisites
need_pkgs=()
need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2")
}
need docker-registry docker-registry
need skopeo skopeo
need umoci umoci
need mkfs.ext4 e2fsprogs
need e2fsck e2fsprogs
need debootstrap debootstrap
need gzip gzip
need python3 python3
need mountpoint util-linux
[ -x /usr/bin/time ] || need_pkgs+=(time)
python3 -m pip --version >/dev/null 2>&1 || need_pkgs+=(python3-pip)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need_pkgs+=(debian-archive-keyring)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    mapfile -t need_pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
    log "installing prerequisites: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

mkdir -p "$BENCH_DIR"

# ---------------------------------------------------------------- cleanup
WORK=""      # image build scratch
RUN=""       # benchmark scratch
REG_PID=""
MOUNTS=()
cleanup() {
    local rc=$?
    set +e
    for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do
        mountpoint -q "${MOUNTS[$i]}" && umount -l "${MOUNTS[$i]}"
    done
    if [ -n "$REG_PID" ] && kill -0 "$REG_PID" 2>/dev/null; then
        kill "$REG_PID"; wait "$REG_PID" 2>/dev/null
    fi
    [ -n "$WORK" ] && rm -rf "$WORK"
    if [ -n "$RUN" ]; then
        if [ "$KEEP" = 1 ]; then log "kept $RUN"; else rm -rf "$RUN"; fi
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- image build
debian_mirror() {
    if [ -n "${BENCH_MIRROR:-}" ]; then echo "$BENCH_MIRROR"; return; fi
    local m
    # one-line sources: "deb [opts] URI SUITE COMPONENTS"
    m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1=="deb" { for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' \
        | grep -v -e security -e backports | grep -i debian | head -n1 || true)
    if [ -z "$m" ]; then
        # deb822 sources: "URIs: ..." within a stanza whose Suites include bookworm
        m=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
            | awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm( |\n|$)/ && !/security/ {
                     if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { s=substr($0,RSTART,RLENGTH); sub(/URIs:[ \t]*/,"",s); print s } }' \
            | grep -i debian | head -n1 || true)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

in_chroot() { # in_chroot ROOTFS CMD...: run with /proc and /dev mounted, unmount after
    local r="$1"; shift
    mount -t proc proc "$r/proc"; MOUNTS+=("$r/proc")
    mount --bind /dev "$r/dev"; MOUNTS+=("$r/dev")
    local rc=0
    chroot "$r" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@" || rc=$?
    umount "$r/dev"; umount "$r/proc"
    MOUNTS=("${MOUNTS[@]:0:${#MOUNTS[@]}-2}")
    return $rc
}

repack() { # repack BUNDLE COMMENT: one new gzip layer from the bundle's changes
    local t0=$SECONDS
    umoci repack --refresh-bundle --history.created_by "bench/import.sh: $2" \
        --image "$LAYOUT_TMP:$TAG" "$1"
    log "  repacked layer '$2' in $((SECONDS - t0)) s"
}

# Unpack wheels into a site-packages directory (what pip would do, without pip
# installing anything: no PEP 668 issue, no host-python dependency).
extract_wheels() { # extract_wheels WHEELDIR TARGET
    python3 - "$1" "$2" <<'PY'
import os, sys, zipfile, glob, shutil
wheels, target = sys.argv[1], sys.argv[2]
os.makedirs(target, exist_ok=True)
bindir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(target))), "bin")  # /usr/local/bin
for whl in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            name = info.filename
            if name.endswith("/"):
                continue
            parts = name.split("/")
            if parts[0].endswith(".data") and len(parts) > 2:
                kind = parts[1]
                if kind in ("purelib", "platlib"):
                    dest = os.path.join(target, *parts[2:])
                elif kind == "scripts":
                    dest = os.path.join(bindir, *parts[2:])
                else:
                    continue
            else:
                dest = os.path.join(target, *parts)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(dest, 0o755 if (mode & 0o111 or dest.startswith(bindir)) else 0o644)
PY
}

build_image() {
    local t_all=$SECONDS mirror
    mirror=$(debian_mirror)
    log "building the benchmark image into $LAYOUT (mirror $mirror)"
    rm -rf "$LAYOUT" "$BENCH_DIR"/oci-app.tmp "$BENCH_DIR"/build.*
    LAYOUT_TMP="$BENCH_DIR/oci-app.tmp"
    WORK=$(mktemp -d "$BENCH_DIR/build.XXXXXX")
    local B="$WORK/bundle" R="$WORK/bundle/rootfs"

    umoci init --layout "$LAYOUT_TMP"
    umoci new --image "$LAYOUT_TMP:$TAG"
    umoci unpack --image "$LAYOUT_TMP:$TAG" "$B"

    # Layer 1: Debian bookworm minbase.
    local t0=$SECONDS
    log "layer 1: debootstrap --variant=minbase bookworm"
    debootstrap --variant=minbase bookworm "$R" "$mirror" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    # A container image carries an empty /dev; drop debootstrap's device nodes
    # and the host's resolv.conf.
    rm -rf "${R:?}"/dev/* "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*_*
    : > "$R/etc/resolv.conf"
    log "  debootstrap took $((SECONDS - t0)) s"
    repack "$B" "debootstrap --variant=minbase bookworm"

    # Layer 2: python3 and git.
    t0=$SECONDS
    log "layer 2: apt-get install python3 git"
    cp /etc/resolv.conf "$R/etc/resolv.conf"
    in_chroot "$R" sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 git >/dev/null' \
        > "$WORK/apt.log" 2>&1 || { tail -n 30 "$WORK/apt.log" >&2; die "apt-get in the chroot failed"; }
    in_chroot "$R" apt-get clean
    rm -rf "$R"/var/lib/apt/lists/*_* "$R"/var/cache/apt/*.bin "$R"/var/log/apt/* "$R"/var/log/dpkg.log
    : > "$R/etc/resolv.conf"
    log "  apt-get took $((SECONDS - t0)) s"
    repack "$B" "apt-get install python3 git"

    # Layer 3: site-packages from PyPI (cp311 manylinux x86_64 wheels).
    t0=$SECONDS
    log "layer 3: site-packages (${PY_PACKAGES[*]} and deps)"
    mkdir -p "$WORK/wheels"
    python3 -m pip download -q --disable-pip-version-check --no-cache-dir \
        --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --python-version 3.11 --implementation cp --abi cp311 \
        -d "$WORK/wheels" "${PY_PACKAGES[@]}"
    local site="$R/usr/local/lib/python3.11/dist-packages"
    extract_wheels "$WORK/wheels" "$site"
    # Byte-compile with the image's own interpreter, as `pip install` would.
    in_chroot "$R" python3 -m compileall -q -j 1 /usr/local/lib/python3.11/dist-packages >/dev/null
    log "  $(ls "$WORK/wheels" | wc -l) wheels, $(du -sh "$site" | cut -f1) site-packages, $((SECONDS - t0)) s"
    repack "$B" "site-packages: ${PY_PACKAGES[*]}"

    # Layer 4: deletions, replacements, hard links and symlinks.
    log "layer 4: deletions, replacements, links"
    rm -rf "$R/usr/share/doc"                                   # whole directory removed
    find "$R/usr/share/locale" -mindepth 1 -maxdepth 1 -type d ! -name 'en*' -exec rm -rf {} +
    rm -rf "$R/usr/share/man"/??  "$R/usr/share/man"/??_*        # translated man pages
    find "$site" -type d -name tests -path '*/numpy/*' -prune -exec rm -rf {} +
    rm -rf "$site/pandas/tests"                                  # directory -> file
    echo "tests removed from this image" > "$site/pandas/tests"
    rm -f "$R/etc/motd"                                         # file -> directory
    mkdir -p "$R/etc/motd"; echo "welcome to the benchmark image" > "$R/etc/motd/00-bench"
    rm -rf "$R/etc/apt/apt.conf.d"                              # directory deleted and recreated
    mkdir -p "$R/etc/apt/apt.conf.d"
    printf 'APT::Install-Recommends "false";\n' > "$R/etc/apt/apt.conf.d/99-bench"
    rm -rf "$R/usr/share/info"; ln -s /usr/share/doc "$R/usr/share/info"   # dir -> (dangling) symlink
    mkdir -p "$R/opt/app/data"
    head -c 4194304 /dev/urandom > "$R/opt/app/data/blob.bin"
    ln "$R/opt/app/data/blob.bin" "$R/opt/app/data/blob-link1"  # hard links within the layer
    ln "$R/opt/app/data/blob.bin" "$R/opt/app/blob-link2"
    ln "$R/usr/bin/git" "$R/usr/local/bin/git-hardlink"         # hard link to a lower layer's file
    ln "$R/usr/bin/python3.11" "$R/usr/local/bin/python3-hardlink"
    ln "$site/numpy/__init__.py" "$R/opt/app/numpy-init.py"
    cat > "$R/opt/app/main.py" <<'EOF'
import numpy, pandas, flask, requests
print("numpy", numpy.__version__, "pandas", pandas.__version__)
EOF
    ln -s /usr/bin/python3 "$R/usr/local/bin/python"            # symlinks
    ln -s ../lib/python3.11/dist-packages "$R/usr/local/share/site-packages"
    ln -s main.py "$R/opt/app/app.py"
    ln -s /nonexistent/target "$R/opt/app/dangling"
    chmod 0750 "$R/opt/app/data"; chown -R 1000:1000 "$R/opt/app/data"
    chmod 0600 "$R/etc/debian_version"                          # metadata-only change
    repack "$B" "deletions, replacements, links"

    umoci config --image "$LAYOUT_TMP:$TAG" \
        --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --config.env LANG=C.UTF-8 --config.env PYTHONDONTWRITEBYTECODE=1 \
        --config.workingdir /opt/app --config.cmd python3 --config.cmd /opt/app/main.py
    umoci gc --layout "$LAYOUT_TMP"
    echo "$IMAGE_VERSION" > "$LAYOUT_TMP/bench-image-version"
    mv "$LAYOUT_TMP" "$LAYOUT"
    rm -rf "$WORK"; WORK=""
    log "image built in $((SECONDS - t_all)) s"
}

if [ "$REBUILD" = 1 ] || [ "$(cat "$LAYOUT/bench-image-version" 2>/dev/null)" != "$IMAGE_VERSION" ]; then
    build_image
else
    log "using the cached image $LAYOUT (--rebuild to rebuild)"
fi

# Layer blobs of the image, in order.
mapfile -t LAYERS < <(python3 - "$LAYOUT" "$TAG" <<'PY'
import json, sys, os
layout, tag = sys.argv[1], sys.argv[2]
def blob(d): return os.path.join(layout, "blobs", *d.split(":", 1))
idx = json.load(open(os.path.join(layout, "index.json")))
m = [m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag][0]
for l in json.load(open(blob(m["digest"])))["layers"]:
    print(blob(l["digest"]))
PY
)
[ ${#LAYERS[@]} -gt 0 ] || die "no layers found in $LAYOUT"
LAYER_BYTES=0
for l in "${LAYERS[@]}"; do LAYER_BYTES=$((LAYER_BYTES + $(stat -c %s "$l"))); done
log "image: ${#LAYERS[@]} gzip layers, $((LAYER_BYTES / 1000000)) MB"

if [ "$BUILD_ONLY" = 1 ]; then
    for l in "${LAYERS[@]}"; do
        printf '  %s  %6.1f MB\n' "$(basename "$l" | cut -c1-12)" "$(awk -v b="$(stat -c %s "$l")" 'BEGIN{print b/1e6}')"
    done
    exit 0
fi

# ---------------------------------------------------------------- nullspace binary
if [ -n "${NULLSPACE_BIN:-}" ]; then
    NS="$NULLSPACE_BIN"
else
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust or set NULLSPACE_BIN"
    log "cargo build --release -p nullspace"
    (cd "$REPO_DIR" && cargo build --release -q -p nullspace) || die "cargo build failed"
    NS="$REPO_DIR/target/release/nullspace"
fi
[ -x "$NS" ] || die "nullspace binary not found: $NS"
"$NS" image import --help >/dev/null 2>&1 || die "$NS has no 'image import' command"

# ---------------------------------------------------------------- registry
RUN=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$RUN/registry.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $RUN/registry
http:
  addr: 127.0.0.1:$PORT
EOF
docker-registry serve "$RUN/registry.yml" > "$RUN/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    kill -0 "$REG_PID" 2>/dev/null || { cat "$RUN/registry.log" >&2; die "docker-registry exited"; }
    sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || die "docker-registry did not listen on 127.0.0.1:$PORT"
SRC="docker://127.0.0.1:$PORT/$REPO_REF"
log "registry on 127.0.0.1:$PORT; pushing the image"
skopeo copy -q --dest-tls-verify=false "oci:$LAYOUT:$TAG" "$SRC" \
    || die "skopeo copy to the registry failed"

# ---------------------------------------------------------------- measurement
# timed NAME CMD...: run CMD under /usr/bin/time, append "secs kib" to $RUN/t.NAME.
# A failing command ends the benchmark with its output.
timed() {
    local name="$1"; shift
    if ! /usr/bin/time -f '%e %M' -o "$RUN/time.out" "$@" > "$RUN/out.$name" 2>&1; then
        tail -n 40 "$RUN/out.$name" >&2
        die "step '$name' failed: $*"
    fi
    tail -n 1 "$RUN/time.out" >> "$RUN/t.$name"
}
median() { # median of column $2 of file $1
    awk -v c="$2" '{print $c}' "$1" | sort -g | awk '{a[NR]=$1} END {
        if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'
}
maxcol() { awk -v c="$2" 'BEGIN{m=0} $c>m{m=$c} END{print m}' "$1"; }
settle() { sync; }  # flush the previous step's dirty pages outside the timings

# gzip writes to stdout, which timed() captures to a file: use /dev/null instead.
timed_null() {
    local name="$1"; shift
    if ! /usr/bin/time -f '%e %M' -o "$RUN/time.out" "$@" > /dev/null 2> "$RUN/out.$name"; then
        tail -n 40 "$RUN/out.$name" >&2; die "step '$name' failed: $*"
    fi
    tail -n 1 "$RUN/time.out" >> "$RUN/t.$name"
}

MKFS_MB=""
for rep in $(seq 1 "$REPS"); do
    log "repetition $rep/$REPS"

    # nullspace, cold (no layer cache)
    rm -rf "$RUN/ns"; settle
    timed import "$NS" image import "$SRC" --output "$RUN/ns" --no-cache
    settle

    # peer pipeline: skopeo copy -> umoci unpack -> mkfs.ext4 -d
    rm -rf "$RUN/peer"; mkdir -p "$RUN/peer"; settle
    timed skopeo skopeo copy -q --src-tls-verify=false "$SRC" "oci:$RUN/peer/oci:1"
    settle
    timed umoci umoci unpack --image "$RUN/peer/oci:1" "$RUN/peer/bundle"
    settle
    if [ -z "$MKFS_MB" ]; then
        UNPACKED_BYTES=$(du -sb "$RUN/peer/bundle/rootfs" | cut -f1)
        ENTRIES=$(find "$RUN/peer/bundle/rootfs" | wc -l)
        MKFS_MB=$(( (2 * UNPACKED_BYTES + 1048575) / 1048576 ))
        [ "$MKFS_MB" -ge 64 ] || MKFS_MB=64
    fi
    rm -f "$RUN/peer.ext4"
    timed mkfs mkfs.ext4 -q -F -d "$RUN/peer/bundle/rootfs" "$RUN/peer.ext4" "${MKFS_MB}M"
    settle

    # decompression floor
    for i in "${!LAYERS[@]}"; do timed_null "gz$i" gzip -dc "${LAYERS[$i]}"; done
done

# nullspace with a warm layer cache: one untimed fill, then the repetitions.
log "warm-cache imports"
rm -rf "$RUN/cache" "$RUN/ns-warm"
timed import_fill "$NS" image import "$SRC" --output "$RUN/ns-warm" --cache-dir "$RUN/cache"
for rep in $(seq 1 "$REPS"); do
    rm -rf "$RUN/ns-warm"; settle
    timed import_warm "$NS" image import "$SRC" --output "$RUN/ns-warm" --cache-dir "$RUN/cache"
done
settle

# ---------------------------------------------------------------- verification
NS_IMG="$RUN/ns/rootfs.ext4"
[ -f "$NS_IMG" ] || die "nullspace wrote no $NS_IMG"
[ -f "$RUN/ns/template.json" ] || die "nullspace wrote no template.json"
FSCK=PASS
e2fsck -fn "$NS_IMG" > "$RUN/fsck.ns" 2>&1 || FSCK=FAIL
e2fsck -fn "$RUN/peer.ext4" > "$RUN/fsck.peer" 2>&1 || true
# Informational: the nullspace tree against umoci unpack's (last repetition), by
# type, mode, owner, size and link count (not for directories: lost+found and
# ext4 block sizes differ by design), link target, and regular files' md5.
TREE="skipped (no loop device)"
tree_list() { (cd "$1" && find . -path ./lost+found -prune -o \
    -printf '%p %y %m %U %G %n %l ' -printf '%s\n' ) | awk '$2=="d"{$(NF-1)="-"; $NF="-"} {print}' | sort
    (cd "$1" && find . -path ./lost+found -prune -o -type f -print0 | sort -z | xargs -0r md5sum); }
if [ -e /dev/loop-control ] && mkdir -p "$RUN/mnt" && mount -o ro,loop "$NS_IMG" "$RUN/mnt" 2>/dev/null; then
    MOUNTS+=("$RUN/mnt")
    tree_list "$RUN/mnt" > "$RUN/tree.ns"
    umount "$RUN/mnt"; MOUNTS=("${MOUNTS[@]:0:${#MOUNTS[@]}-1}")
    tree_list "$RUN/peer/bundle/rootfs" > "$RUN/tree.peer"
    diff "$RUN/tree.peer" "$RUN/tree.ns" > "$RUN/tree.diff" || true
    only_ns=$(grep -c '^>' "$RUN/tree.diff" || true)
    only_peer=$(grep -c '^<' "$RUN/tree.diff" || true)
    if [ "$only_ns$only_peer" = 00 ]; then
        TREE="identical ($(wc -l < "$RUN/tree.ns") entries)"
    else
        TREE="$only_peer lines only in umoci's, $only_ns only in nullspace's"
    fi
fi
fsck_summary() { grep -E '[0-9]+/[0-9]+ files .*blocks' "$1" | sed 's/^[^:]*: //' | head -n1 || true; }

# ---------------------------------------------------------------- report
# Per repetition: the peer total and the floor sum / largest layer.
paste -d' ' "$RUN/t.skopeo" "$RUN/t.umoci" "$RUN/t.mkfs" \
    | awk '{print $1+$3+$5, ($2>$4?($2>$6?$2:$6):($4>$6?$4:$6))}' > "$RUN/t.peer"
gzfiles=(); for i in "${!LAYERS[@]}"; do gzfiles+=("$RUN/t.gz$i"); done
paste -d' ' "${gzfiles[@]}" | awk '{s=0; m=0; r=0; for (i=1;i<=NF;i+=2) { s+=$i; if ($i>m) m=$i; if ($(i+1)>r) r=$(i+1) } print s, r, m}' > "$RUN/t.floor"
awk '{print $3, $2}' "$RUN/t.floor" > "$RUN/t.floor1"
# Lower bound for 2 cores decompressing layers in parallel: max(largest layer, sum / 2).
awk '{h=$1/2; print ($3>h?$3:h), $2}' "$RUN/t.floor" > "$RUN/t.floor2"

row() { # row LABEL FILE: median s, min s, max s, peak RSS MiB (max over reps)
    local f="$2"
    printf '%-44s %8.2f %8.2f %8.2f %9.1f\n' "$1" "$(median "$f" 1)" \
        "$(awk 'NR==1||$1<m{m=$1} END{print m}' "$f")" "$(maxcol "$f" 1)" \
        "$(echo "$(maxcol "$f" 2)" | awk '{print $1/1024}')"
}

T_IMPORT=$(median "$RUN/t.import" 1)
T_WARM=$(median "$RUN/t.import_warm" 1)
T_PEER=$(median "$RUN/t.peer" 1)
T_FLOOR=$(median "$RUN/t.floor" 1)
T_FLOOR1=$(median "$RUN/t.floor1" 1)
RSS_IMPORT=$(awk '{printf "%.1f", $1/1024}' <<< "$(maxcol "$RUN/t.import" 2)")
RSS_WARM=$(awk '{printf "%.1f", $1/1024}' <<< "$(maxcol "$RUN/t.import_warm" 2)")
T_FLOOR2=$(median "$RUN/t.floor2" 1)
NS_MB=$(( $(stat -c %s "$NS_IMG") / 1048576 ))

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a/b; else print "inf" }'; }
R_PEER=$(ratio "$T_PEER" "$T_IMPORT")
R_FLOOR=$(ratio "$T_IMPORT" "$T_FLOOR")
R_FLOOR1=$(ratio "$T_IMPORT" "$T_FLOOR1")
R_FLOOR2=$(ratio "$T_IMPORT" "$T_FLOOR2")
R_WARM=$(ratio "$T_PEER" "$T_WARM")
verdict() { # verdict VALUE OP TARGET
    awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN {
        if (op == ">=") ok = (v + 0 >= t + 0); else if (op == "<=") ok = (v + 0 <= t + 0); else ok = (v + 0 < t + 0)
        print (ok ? "PASS" : "MISS") }'
}

echo
echo "nullspace image import benchmark  ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $REPS repetitions, median)"
echo "image: ${#LAYERS[@]} gzip layers, $((LAYER_BYTES / 1000000)) MB compressed; unpacked $((UNPACKED_BYTES / 1000000)) MB, $ENTRIES entries (umoci unpack)"
echo "source: $SRC (docker-registry on loopback)"
echo
printf '%-44s %8s %8s %8s %9s\n' "step" "median s" "min s" "max s" "peak MiB"
printf '%-44s %8s %8s %8s %9s\n' "----" "--------" "-----" "-----" "--------"
row "nullspace image import --no-cache" "$RUN/t.import"
row "nullspace image import, warm --cache-dir" "$RUN/t.import_warm"
row "  (first import filling the cache)" "$RUN/t.import_fill"
row "skopeo copy registry -> oci:" "$RUN/t.skopeo"
row "umoci unpack" "$RUN/t.umoci"
row "mkfs.ext4 -d (${MKFS_MB} MiB)" "$RUN/t.mkfs"
row "peer total (skopeo + umoci + mkfs.ext4 -d)" "$RUN/t.peer"
row "gzip -dc floor, all layers sequential" "$RUN/t.floor"
row "gzip -dc floor, 2 cores: max(largest, sum/2)" "$RUN/t.floor2"
row "gzip -dc floor, largest layer alone" "$RUN/t.floor1"
for i in "${!LAYERS[@]}"; do
    row "  gzip -dc layer $((i + 1)) ($(( $(stat -c %s "${LAYERS[$i]}") / 1000000 )) MB)" "$RUN/t.gz$i"
done
echo
echo "nullspace rootfs.ext4: ${NS_MB} MiB; e2fsck -fn: $FSCK ($(fsck_summary "$RUN/fsck.ns"))"
echo "peer ext4 (mkfs.ext4 -d):  ${MKFS_MB} MiB; e2fsck -fn: $(fsck_summary "$RUN/fsck.peer")"
echo "tree vs umoci unpack (type mode owner nlink target size md5): $TREE"
if [ -s "${RUN}/tree.diff" ]; then grep '^[<>]' "$RUN/tree.diff" | head -n 12 | sed 's/^/    /'; fi
echo
echo "ratios                                         value   target   result"
printf '%-44s %7sx  %-7s  %s\n' "peer total / import (cold)" "$R_PEER" ">= 3" "$(verdict "$R_PEER" ">=" 3)"
printf '%-44s %7sx  %-7s  %s\n' "import (cold) / gzip -dc floor (sequential)" "$R_FLOOR" "<= 1.5" "$(verdict "$R_FLOOR" "<=" 1.5)"
printf '%-44s %7s   %-7s  %s\n' "import peak RSS MiB" "$RSS_IMPORT" "< 512" "$(verdict "$RSS_IMPORT" "<" 512)"
printf '%-44s %7sx\n' "import (cold) / 2-core parallel floor" "$R_FLOOR2"
printf '%-44s %7sx\n' "import (cold) / largest-layer floor" "$R_FLOOR1"
printf '%-44s %7sx\n' "peer total / import (warm cache)" "$R_WARM"
printf '%-44s %7s\n' "import (warm cache) peak RSS MiB" "$RSS_WARM"
printf '%-44s %7s\n' "e2fsck -fn of the nullspace rootfs" "$FSCK"
[ "$FSCK" = PASS ] || { echo; sed 's/^/  /' "$RUN/fsck.ns" | head -n 30; die "e2fsck found errors in the nullspace rootfs"; }
