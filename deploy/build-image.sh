#!/bin/sh
# Build the Conveyor Docker image without pulling anything from a registry.
#
#   1. a Debian base image, made once with debootstrap (minbase + python3 + python3-venv) and
#      `docker import`, cached by its tag ($CONVEYOR_BASE_IMAGE, default conveyor-base:bookworm);
#   2. a wheelhouse built on this host (deploy/wheelhouse: Conveyor and every dependency as wheels),
#      since pip inside a container may not reach the package index;
#   3. the Conveyor image ($CONVEYOR_IMAGE, default conveyor:latest) from deploy/Dockerfile,
#      installing from the wheelhouse with --no-index.
#
# Needs root (debootstrap), docker, debootstrap and a Python with pip on this host.
# Usage: deploy/build-image.sh            (or: sudo deploy/build-image.sh)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
BASE_IMAGE=${CONVEYOR_BASE_IMAGE:-conveyor-base:bookworm}
IMAGE=${CONVEYOR_IMAGE:-conveyor:latest}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-python3}
wheelhouse="$here/wheelhouse"

say() { echo "build-image: $*" >&2; }
die() { say "$*"; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is needed: $2"; }

need docker "apt-get install docker.io"
docker info >/dev/null 2>&1 || die "cannot reach the Docker daemon (is dockerd running? are you root?)"

# 1. the base image, once
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $BASE_IMAGE: cached"
else
    need debootstrap "apt-get install debootstrap"
    [ "$(id -u)" = 0 ] || die "debootstrap needs root"
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/conveyor-rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT INT TERM
    say "debootstrap $SUITE (minbase, python3, python3-venv) from $MIRROR: about a minute"
    debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; die "debootstrap failed"; }
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' \
        -c 'CMD ["/bin/sh"]' \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT INT TERM
    say "base image $BASE_IMAGE: built"
fi

# 2. the wheelhouse, for the image's Python
image_py=$(docker run --rm "$BASE_IMAGE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
host_py=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
mkdir -p "$wheelhouse"
rm -f "$wheelhouse"/conveyor-*.whl
if [ "$image_py" = "$host_py" ]; then
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check -w "$wheelhouse" "$root"
else
    # a different Python here: build Conveyor's own (pure) wheel, fetch binary wheels for the image's Python
    say "host Python $host_py, image Python $image_py: downloading wheels for $image_py"
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$wheelhouse" "$root"
    arch=$(uname -m)
    "$PYTHON" -m pip download --quiet --disable-pip-version-check -d "$wheelhouse" --only-binary=:all: \
        --python-version "$image_py" --implementation cp \
        --platform "manylinux2014_$arch" --platform "manylinux_2_17_$arch" --platform "manylinux_2_28_$arch" \
        --platform "manylinux_2_34_$arch" --platform "any" \
        "$wheelhouse"/conveyor-*.whl
fi
say "wheelhouse: $(ls "$wheelhouse" | wc -l) wheels in $wheelhouse"

# 3. the Conveyor image (layers are cached; only a changed wheelhouse or code rebuilds)
docker build --quiet -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE" -f "$here/Dockerfile" "$root" >/dev/null
say "image $IMAGE: built"
