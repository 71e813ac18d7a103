#!/usr/bin/env bash
# Builds tether's OCI image archive without a Docker engine (buildah, vfs
# storage, as root): the Dockerfile's runtime stage over the static rootfs
# that `make static-rootfs` made. Reproducible: fixed timestamps and a tar
# with fixed order, owners and times, so the same source gives the same
# bytes.
# Usage: image/build.sh ROOTFS IMAGE_NAME OUT_TAR
set -euo pipefail
rootfs=$1 name=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)
command -v buildah >/dev/null || { echo "image: buildah is missing (apt-get install buildah)" >&2; exit 1; }
work=$(mktemp -d)
store=$work/storage
cleanup() {
    buildah --root "$store" --runroot "$work/run" --storage-driver vfs rmi -af >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

# The runtime stage, with the build stage's output replaced by the rootfs
# given here. Everything after the last FROM is copied as it stands.
python3 "$here/containerfile.py" "$here/../Dockerfile" >"$work/Containerfile"
mkdir -p "$work/context"
cp -a "$rootfs" "$work/context/rootfs"

b=(buildah --root "$store" --runroot "$work/run" --storage-driver vfs)
"${b[@]}" build -q --timestamp 0 --layers=false --pull=never \
    -f "$work/Containerfile" -t "$name" "$work/context" >/dev/null
"${b[@]}" push -q --format oci --disable-compression=false \
    "$name" "oci:$work/oci:$name" >/dev/null

# An OCI image layout in one tar, byte for byte the same on every run.
mkdir -p "$(dirname "$out")"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$work/oci" -cf "$out.tmp" .
mv "$out.tmp" "$out"
digest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$work/oci/index.json")
echo "image: $name"
echo "archive: $out ($(du -h "$out" | cut -f1), sha256 $(sha256sum "$out" | cut -d' ' -f1))"
echo "manifest digest: $digest"
