#!/usr/bin/env bash
# Makes a Python base image from Debian's own packages, for machines that reach Debian's mirror but not
# Docker Hub: debootstrap (minbase + python3, venv, CA certificates), then `docker import`. Debian bookworm's
# python3 is 3.11, the Python the lock was resolved for. About a minute; ~250 MB.
#
#   bash docker/debian-base.sh [TAG]        (default sdsclip-local/debian-python3:bookworm)
set -euo pipefail
tag=${1:-sdsclip-local/debian-python3:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}
command -v debootstrap >/dev/null || { echo "debootstrap not found: apt-get install -y debootstrap" >&2; exit 2; }
rootfs=$(mktemp -d /var/tmp/sdsclip-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
# what an apt-based base image ships without: downloaded .debs and package lists
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
# docker import keeps no environment: give it the PATH and locale every Debian / python image has
tar -C "$rootfs" -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$tag" >/dev/null
echo "made $tag ($("$docker" run --rm --network none "$tag" python3 --version))"
