#!/usr/bin/env bash
# resources/build-passt.sh: a static passt for `--net user`, built from a
# pinned upstream snapshot.
#
# Why not the distribution's: Debian 12's passt (0.0~git20230309) carries
# outbound traffic and DHCP, but the reply on a published port
# (`--net user,publish=H:G`) never reaches the host's client; the 2025-05
# snapshot below carries it (boot case net_user). The source is
# Debian's copy of the upstream tarball, the .orig.tar.xz of Debian's
# source package of that snapshot (in trixie), fetched by `apt-get source
# --download-only` through a private deb-src stanza derived from the
# system's Debian source (resources/harness/apt.sh) and checked against a
# pinned SHA-256; the build is static, so the same binary runs on the host,
# in the nested harness's busybox L1 and on CI runners. Built once into
# ${CAPSULE_CACHE:-~/.cache/capsule}/passt/<key>/ (passt and passt.avx2,
# which passt runs in its place on CPUs with AVX2), keyed by this script.
#
# Give it to capsule with CAPSULE_PASST=<printed path>.
#
# Usage: resources/build-passt.sh      prints the path of the passt binary
# Env:   CAPSULE_PASST_SUITE  the Debian suite whose sources have it (default trixie)
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=resources/harness/apt.sh
source "$CAPSULE_RESOURCES_DIR/harness/apt.sh"

if [[ "${CAPSULE_SKIP_DEPS:-0}" != 1 ]]; then
    "$CAPSULE_RESOURCES_DIR/install-deps.sh"
fi

version="0.0~git20250503.587980c"
sha256="69d5eb843f7d648c2cc60bfbca6ea7b5014c6b6f07cdee362c2a8cf490515a49"
suite="${CAPSULE_PASST_SUITE:-trixie}"
tarball="passt_${version}.orig.tar.xz"

key="$(hash_inputs "$version" "$sha256" "${BASH_SOURCE[0]}")"
final="$(capsule_cache_root)/passt/$key"
cache_lock passt
exit_if_cached "$final/passt"

tmp="$(cache_tmpdir "$final")"
trap 'rm -rf "$tmp"' EXIT

private_apt "$suite" deb-src
# The Debian revision of that upstream snapshot (e.g. -2+deb13u1) may
# change with stable updates; the .orig tarball does not.
srcver="$(apt-cache showsrc passt | sed -n 's/^Version: //p' | grep -F "$version-" | sort -V | tail -n1 || true)"
[[ -n "$srcver" ]] ||
    die "the $suite sources have no passt $version (they have: $(apt-cache showsrc passt | sed -n 's/^Version: //p' | tr '\n' ' '))"
log "downloading passt $srcver sources ($suite)"
mkdir "$tmp/dl"
# Only the .orig tarball is needed: a missing .dsc or debian.tar (some
# mirrors of the registry serve pool files selectively) is not an error as
# long as the tarball arrived (apt checked it against the signed Sources
# index; the pinned SHA-256 below checks it again).
(cd "$tmp/dl" && apt-get -q source --download-only "passt=$srcver" >&2) ||
    log "apt-get source did not fetch every file of passt $srcver; the tarball is what counts"
[[ -f "$tmp/dl/$tarball" ]] || die "apt-get source --download-only passt=$srcver gave no $tarball"
mv "$tmp/dl/$tarball" "$tmp/$tarball"
echo "$sha256  $tmp/$tarball" | sha256sum -c --quiet - ||
    die "$tarball does not match its pinned SHA-256"
mkdir "$tmp/src"
tar -xJf "$tmp/$tarball" -C "$tmp/src" --strip-components=1

log "building passt $version (static)"
# GLIBC_NO_STATIC_NSS: passt's own switch for static glibc builds (no
# getpwnam through NSS: it drops to the numeric nobody user instead).
make -C "$tmp/src" -j"$(nproc)" passt passt.avx2 VERSION="$version" \
    CPPFLAGS=-DGLIBC_NO_STATIC_NSS LDFLAGS=-static >"$tmp/build.log" 2>&1 || {
    tail -n 20 "$tmp/build.log" >&2
    die "building passt failed"
}
mkdir "$tmp/out"
install -m 755 "$tmp/src/passt" "$tmp/src/passt.avx2" "$tmp/out/"
file_is_static "$tmp/out/passt" || die "the passt build is not static"
cache_publish "$tmp/out" "$final"
log "built $final/passt"
echo "$final/passt"
