#!/usr/bin/env bash
# Builds the shoal image as an OCI image archive on a machine without a Docker daemon or
# access to a container registry (`make image` calls it). It cannot pull a base image, so it
# assembles the root filesystem itself: the shoal binary, the shared libraries it links
# (from ldd) and an /etc/passwd naming the non-root user, committed FROM scratch with
# buildah. User, entrypoint, command and labels are the Dockerfile's (tests/e2e/image.rs
# checks both).
#
#   image/build.sh BINARY OUT.tar [NAME:TAG]
#
# Needs buildah (Debian: apt-get install buildah). Its storage is a temporary directory
# (vfs driver, chroot isolation), removed at the end: nothing is left in /var/lib/containers.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 BINARY OUT.tar [NAME:TAG]" >&2; exit 2; }
bin="$1" out="$2"
here="$(cd "$(dirname "$0")/.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/Cargo.toml" | head -1)"
name="${3:-shoal:$version}"
revision="$(git -C "$here" rev-parse HEAD 2>/dev/null || echo unknown)"
command -v buildah >/dev/null || { echo "buildah is missing: apt-get install -y buildah" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/shoal-image.XXXXXX")"
export BUILDAH_ISOLATION=chroot
storage=(--root "$work/storage" --runroot "$work/run" --storage-driver vfs)
cleanup() { buildah "${storage[@]}" rm --all >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

rootfs="$work/rootfs"
mkdir -p "$rootfs/etc"
install -m 0755 "$bin" "$rootfs/shoal"
strip "$rootfs/shoal" 2>/dev/null || true
# Every library the binary links, and the dynamic loader, at the paths ldd resolves them to.
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
echo "nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin" > "$rootfs/etc/passwd"
echo "nonroot:x:65532:" > "$rootfs/etc/group"

ctr="$(buildah "${storage[@]}" from scratch)"
buildah "${storage[@]}" copy --quiet "$ctr" "$rootfs" / >/dev/null
buildah "${storage[@]}" config \
  --os linux --arch "$(dpkg --print-architecture 2>/dev/null || echo amd64)" \
  --user 65532:65532 --entrypoint '["/shoal"]' --cmd '["run"]' --port 8080/tcp \
  --label org.opencontainers.image.title=shoal \
  --label "org.opencontainers.image.description=A highly available Kubernetes workflow operator whose replicas share the work through shard Leases." \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.revision=$revision" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  "$ctr"
buildah "${storage[@]}" commit --quiet --format oci "$ctr" "$name" >/dev/null
mkdir -p "$(dirname "$out")"
rm -f "$out"
buildah "${storage[@]}" push --quiet "$name" "oci-archive:$out:$name"
echo "$out: $name ($(du -h "$out" | cut -f1))"
