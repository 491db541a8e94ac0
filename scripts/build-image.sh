#!/usr/bin/env bash
# Builds ringcache's container image without a Docker daemon: the release
# binaries, the shared libraries they load, a non-root user and CA
# certificates in one layer, assembled with umoci into an OCI image (the
# same layout as the Dockerfile's: /usr/local/bin/{cache-node,orchestrator},
# user 65532, no shell, cache-node as the entrypoint).
#
#   scripts/build-image.sh [--tag TAG] [--bin-dir DIR] [--out DIR]
#                          [--archive FILE] [--push REF]
#
#   --tag TAG       image tag (default: the workspace version, e.g. 0.1.0)
#   --bin-dir DIR   take cache-node and orchestrator from DIR instead of
#                   building them (cargo build --profile image); their debug
#                   info is stripped
#   --out DIR       the OCI layout to write (default: target/image/oci);
#                   run it with `podman run oci:DIR:TAG`
#   --archive FILE  also write a docker-archive tarball, for `docker load`,
#                   `podman load` or `kind load image-archive`
#   --push REF      also push with skopeo, e.g.
#                   docker://registry.example.com/ringcache:0.1.0 (skopeo's
#                   --dest-creds/--dest-tls-verify through SKOPEO_ARGS)
#
# Runs as root. The tools (umoci, skopeo) come from Debian:
# scripts/install-debs.sh image.
# Prints the image reference (oci:DIR:TAG) on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

tag="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
bin_dir="" out="target/image/oci" archive="" push=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --archive) archive="$2"; shift 2 ;;
    --push) push="$2"; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "build-image: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$tag" ]] || { echo "build-image: no --tag and no version in Cargo.toml" >&2; exit 2; }
# The layer records file owners (root, and 65532 for its home): that takes
# root, as a Docker build does.
[[ $(id -u) -eq 0 ]] || { echo "build-image: run as root (the image's files are owned by root and 65532)" >&2; exit 1; }
scripts/install-debs.sh image

if [[ -z "$bin_dir" ]]; then
  echo "build-image: cargo build --profile image --bins" >&2
  cargo build --locked --profile image --bins
  bin_dir="target/image"
fi
for b in cache-node orchestrator; do
  [[ -x "$bin_dir/$b" ]] || { echo "build-image: no $bin_dir/$b" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/home/nonroot" "$root/tmp"
install -m 0755 "$bin_dir/cache-node" "$bin_dir/orchestrator" "$root/usr/local/bin/"
# No debug info in the image, whatever profile built the binaries (symbol
# names stay, for backtraces).
strip --strip-debug "$root/usr/local/bin/cache-node" "$root/usr/local/bin/orchestrator"

# The shared libraries the binaries load (glibc, libgcc_s, the loader), at
# the paths the binaries look for them: what distroless/cc provides.
libs="$(ldd "$bin_dir/cache-node" "$bin_dir/orchestrator" | grep -oE '/[^ ]+' | sort -u)"
for lib in $libs; do
  [[ -e "$lib" ]] || continue
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

# Users: root (for files) and nonroot (65532, as distroless), no login
# shell anywhere because there is no shell.
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$root/etc/group"
# Name resolution through files then DNS (--nodes-dns, OTLP endpoints).
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
fi
chown 65532:65532 "$root/home/nonroot"
chmod 1777 "$root/tmp"

# The image's architecture is the binaries': read from their ELF header
# (e_machine, two bytes at offset 18).
case "$(od -An -tx2 -j18 -N2 "$bin_dir/cache-node" | tr -d ' ')" in
  003e) arch=amd64 ;;
  00b7) arch=arm64 ;;
  *) echo "build-image: $bin_dir/cache-node is not an x86-64 or aarch64 Linux binary" >&2; exit 1 ;;
esac

mkdir -p "$(dirname "$out")"
rm -rf "$out"
umoci init --layout "$out"
umoci new --image "$out:$tag"
umoci insert --image "$out:$tag" --history.created_by "scripts/build-image.sh" "$root" /
umoci config --image "$out:$tag" \
  --os linux --architecture "$arch" \
  --config.user 65532:65532 \
  --config.workingdir / \
  --config.entrypoint /usr/local/bin/cache-node \
  --config.exposedports 50051/tcp --config.exposedports 50061/tcp \
  --config.exposedports 9090/tcp --config.exposedports 9091/tcp \
  --config.label org.opencontainers.image.title=ringcache \
  --config.label "org.opencontainers.image.version=$tag" \
  --history.created_by "umoci config (user 65532, entrypoint cache-node)"
umoci gc --layout "$out"

if [[ -n "$archive" ]]; then
  rm -f "$archive"
  skopeo copy --quiet "oci:$out:$tag" "docker-archive:$archive:ringcache:$tag"
  echo "build-image: wrote $archive (ringcache:$tag)" >&2
fi
if [[ -n "$push" ]]; then
  # shellcheck disable=SC2086
  skopeo copy ${SKOPEO_ARGS:-} "oci:$out:$tag" "$push"
  echo "build-image: pushed $push" >&2
fi
echo "oci:$out:$tag"
