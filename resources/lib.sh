# shellcheck shell=bash
# resources/lib.sh: helpers shared by the capsule resource scripts.
#
# Source it, don't run it. Provides:
#   log MSG...            progress message on stderr
#   die MSG...            error message on stderr, exit 1
#   capsule_cache_root    the cache root (${CAPSULE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/capsule})
#   hash_inputs ARGS...   sha256 (first 16 hex digits) over strings and files;
#                         an argument naming an existing file contributes its
#                         contents, any other argument contributes itself
#   exit_if_cached PATH   if the built artefact PATH exists: says so, prints
#                         PATH and ends the calling script
#   cache_publish TMPDIR FINAL
#                         atomically renames a fully built TMPDIR to FINAL
#                         (the same filesystem; a concurrent winner is kept)
#   cache_lock KIND       waits for, then holds until the script ends, the
#                         lock of cache entry kind KIND, so a second build
#                         of the same thing (tests/run.sh's background
#                         prefetch and a test wanting it now) waits for the
#                         first and finds it cached instead of building it
#                         again beside it

CAPSULE_RESOURCES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CAPSULE_REPO_DIR="$(cd "$CAPSULE_RESOURCES_DIR/.." && pwd)"
export CAPSULE_RESOURCES_DIR CAPSULE_REPO_DIR

log() {
    printf '[%s] %s\n' "$(basename "$0")" "$*" >&2
}

die() {
    printf '[%s] ERROR: %s\n' "$(basename "$0")" "$*" >&2
    exit 1
}

capsule_cache_root() {
    local root="${CAPSULE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/capsule}"
    mkdir -p "$root"
    (cd "$root" && pwd)
}

hash_inputs() {
    local arg
    {
        for arg in "$@"; do
            if [[ -f "$arg" ]]; then
                printf 'file:%s\n' "$(basename "$arg")"
                cat "$arg"
            else
                printf 'str:%s\n' "$arg"
            fi
            printf '\0'
        done
    } | sha256sum | cut -c1-16
}

exit_if_cached() {
    [[ -e "$1" ]] || return 0
    log "cached: $1"
    echo "$1"
    exit 0
}

cache_lock() {
    local lock
    lock="$(capsule_cache_root)/$1.lock"
    exec 9>"$lock"
    if ! flock -n 9; then
        log "waiting for another build of $1 (lock $lock)"
        flock 9
    fi
}

# Make a fresh temporary directory next to FINAL (so that the rename into
# place is atomic) and print its path.
cache_tmpdir() {
    local final="$1"
    mkdir -p "$(dirname "$final")"
    mktemp -d "$(dirname "$final")/.tmp.$(basename "$final").XXXXXX"
}

cache_publish() {
    local tmp="$1" final="$2"
    if mv -T "$tmp" "$final" 2>/dev/null; then
        return 0
    fi
    if [[ -d "$final" ]]; then
        # Someone else published the same key first; theirs is as good.
        rm -rf "$tmp"
        return 0
    fi
    die "could not move $tmp to $final"
}

# populate_busybox_root DIR: a minimal root filesystem skeleton in DIR with
# the static busybox as /bin/busybox and a symlink for each of its applets.
# The links are relative (bin/sh -> busybox, sbin/poweroff -> ../bin/busybox)
# so that writing through one never reaches the host's /bin/busybox, and
# there are none for the `init` and `linuxrc` applets: DIR/init and
# DIR/sbin/init are for the caller to write.
populate_busybox_root() {
    local root="$1" bb applet dir up
    bb="$(command -v busybox || true)"
    [[ -n "$bb" ]] || die "busybox not found (package busybox-static)"
    if ! file_is_static "$bb"; then
        die "$bb is not statically linked (install busybox-static)"
    fi
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc,lib/modules,run,mnt}
    chmod 1777 "$root/tmp"
    cp "$bb" "$root/bin/busybox"
    while IFS= read -r applet; do
        case "$applet" in
        "" | */init | init | linuxrc | */linuxrc) continue ;;
        esac
        [[ ! -e "$root/$applet" && ! -L "$root/$applet" ]] || continue
        dir="$(dirname "$applet")"
        # One "../" per directory level of the link, back to the root.
        up="$(printf '%s' "$dir" | sed 's|[^/][^/]*|..|g')"
        mkdir -p "$root/$dir"
        ln -s "$up/bin/busybox" "$root/$applet"
    done < <("$bb" --list-full)
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
}

# file_is_static PATH: true if PATH is an ELF with no program interpreter.
file_is_static() {
    # An ELF executable with a PT_INTERP segment is dynamically linked.
    ! LC_ALL=C readelf -lW "$1" 2>/dev/null | grep 'Requesting program interpreter' >/dev/null &&
        LC_ALL=C readelf -h "$1" >/dev/null 2>&1
}

# make_cpio DIR OUT [gzip]: pack DIR as a newc cpio archive owned by root,
# in a stable file order; gzip -9 it when the third argument is "gzip".
make_cpio() {
    local root="$1" out="$2" compress="${3:-}"
    (
        cd "$root" || exit 1
        find . -mindepth 1 | LC_ALL=C sort |
            cpio --quiet -o -H newc -R 0:0 --reproducible
    ) >"$out.raw"
    if [[ "$compress" == gzip ]]; then
        gzip -9 -n <"$out.raw" >"$out"
        rm -f "$out.raw"
    else
        mv "$out.raw" "$out"
    fi
}

# copy_tools DIR TOOL...: host programs with their shared libraries in DIR,
# so that they also run where only busybox is (in L1, or in a guest): each
# DIR/TOOL runs DIR/bin/TOOL through the dynamic loader in DIR/lib.
copy_tools() {
    local dir="$1" tool path lib
    shift
    mkdir -p "$dir/bin" "$dir/lib"
    for tool in "$@"; do
        path="$(command -v "$tool")" || die "$tool not found"
        cp -L "$path" "$dir/bin/$tool"
        while read -r lib; do
            [[ -z "$lib" ]] || cp -L "$lib" "$dir/lib/"
        done < <(ldd "$path" | awk '/=>/ { print $3 } /^\t\// { print $1 }')
        cat >"$dir/$tool" <<EOF
#!/bin/sh
d="\$(cd "\$(dirname "\$0")" && pwd)"
exec "\$d/lib/ld-linux-x86-64.so.2" --library-path "\$d/lib" "\$d/bin/$tool" "\$@"
EOF
        chmod 755 "$dir/$tool"
    done
}

# copy_binary DIR PATH: like copy_tools for a program given by its path
# (DIR/NAME runs it through the loader copied into DIR/lib).
copy_binary() {
    local dir="$1" path="$2" name lib
    name="$(basename "$2")"
    mkdir -p "$dir/bin" "$dir/lib"
    cp -L "$path" "$dir/bin/$name"
    while read -r lib; do
        [[ -z "$lib" ]] || cp -L "$lib" "$dir/lib/"
    done < <(ldd "$path" | awk '/=>/ { print $3 } /^\t\// { print $1 }')
    cat >"$dir/$name" <<EOF
#!/bin/sh
d="\$(cd "\$(dirname "\$0")" && pwd)"
exec "\$d/lib/ld-linux-x86-64.so.2" --library-path "\$d/lib" "\$d/bin/$name" "\$@"
EOF
    chmod 755 "$dir/$name"
}

# The reference VMMs for side-by-side rows (Firecracker, Cloud Hypervisor):
# unmodified builds kept beside the clone (their README there says how they
# were built), or where CAPSULE_ANCHORS points. A user's machine has none:
# the benchmarks then print their tables without those columns and say so.
capsule_anchors_dir() {
    echo "${CAPSULE_ANCHORS:-$CAPSULE_REPO_DIR/../shared/anchors}"
}

# copy_peers DIR: copies each reference VMM found (firecracker,
# cloud-hypervisor) into DIR like copy_tools; prints the names of those
# copied on one line (empty if none) and logs a note for each missing one.
copy_peers() {
    local dir="$1" anchors peers="" p
    anchors="$(capsule_anchors_dir)"
    for p in firecracker cloud-hypervisor; do
        if [[ -f "$anchors/$p/$p" && -x "$anchors/$p/$p" ]]; then
            copy_binary "$dir" "$anchors/$p/$p"
        elif [[ -f "$anchors/$p" && -x "$anchors/$p" ]]; then
            copy_binary "$dir" "$anchors/$p"
        else
            log "note: $p not found in $anchors (set CAPSULE_ANCHORS): its column is skipped"
            continue
        fi
        peers+="${peers:+ }$p"
    done
    echo "$peers"
}

# min_median_max FORMAT: "min median max" of the numbers on stdin, each
# printed with the printf FORMAT (e.g. %.1f), or "- - -" if there are none.
min_median_max() {
    sort -n | awk -v f="$1" '{ v[NR] = $1 } END {
        if (NR == 0) { print "- - -"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf f " " f " " f "\n", v[1], m, v[NR] }'
}

# exits_table RESULTS PREFIX LABEL...: L1's KVM exit counts (resources/
# kvm-host.sh, kvm_exits_report) kept in RESULTS as "PREFIX LABEL EVENT
# KEY=COUNT..." lines, one table line per LABEL and event: the median of
# each key over LABEL's lines (a key missing from a line counts 0 there).
exits_table() {
    local results="$1" prefix="$2" label ev
    shift 2
    for label in "$@"; do
        for ev in kvm_exit kvm_userspace_exit kvm_inj_virq; do
            { grep -F "$prefix $label $ev " "$results" || true; } | sed "s/^.* $ev //" | awk -v l="$label" -v e="$ev" '
                { n++; for (i = 1; i <= NF; i++) { split($i, kv, "="); val[kv[1], n] = kv[2]; keys[kv[1]] = 1 } }
                END {
                    if (!n) exit
                    line = sprintf("%-30s %-18s", l, e)
                    # keys in order, total last
                    nk = 0
                    for (k in keys) if (k != "total") ks[++nk] = k
                    for (x = 2; x <= nk; x++) { y = ks[x]; z = x - 1; while (z > 0 && ks[z] > y) { ks[z + 1] = ks[z]; z-- } ks[z + 1] = y }
                    if ("total" in keys) ks[++nk] = "total"
                    for (q = 1; q <= nk; q++) {
                        k = ks[q]
                        delete a
                        for (j = 1; j <= n; j++) a[j] = val[k, j] + 0
                        # median by insertion sort (a handful of runs)
                        for (x = 2; x <= n; x++) { y = a[x]; z = x - 1; while (z > 0 && a[z] > y) { a[z + 1] = a[z]; z-- } a[z + 1] = y }
                        m = (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
                        line = line sprintf(" %s=%d", k, m)
                    }
                    print line " (" n " runs)"
                }'
        done
    done
}

# copy_qemu_firmware DIR: the firmware QEMU's microvm machine loads (qboot
# and its option ROMs), for `qemu-system-x86_64 -L DIR` where
# /usr/share/qemu is not (in L1).
copy_qemu_firmware() {
    local f
    mkdir -p "$1"
    for f in bios-microvm.bin linuxboot_dma.bin kvmvapic.bin; do
        cp "/usr/share/qemu/$f" "$1/"
    done
}

# run_in_l1_retrying OUT SCRIPT FILE...: resources/harness/run-in-l1.sh
# SCRIPT FILE... with L1's console (without \r) in the file OUT and on
# stderr. The nested harness's L1 now and then hangs for reasons of its own
# (TCG); when L1 hangs, times out or dies without SCRIPT's status (124-126),
# it is run again in a new L1, up to 3 times in all. Returns SCRIPT's status.
run_in_l1_retrying() {
    local out="$1" attempt rc
    shift
    for attempt in 1 2 3; do
        rc=0
        "$CAPSULE_RESOURCES_DIR/harness/run-in-l1.sh" "$@" </dev/null |
            tr -d '\r' | tee "$out" >&2 || rc=$?
        if [[ $rc -lt 124 || $rc -gt 126 ]]; then
            return "$rc"
        fi
        log "L1 failed (status $rc, attempt $attempt of 3)"
    done
    return "$rc"
}

# guest_init_common: the first lines of the test guests' init scripts
# (initramfs /init and the ext4 image's /sbin/init): PATH, /proc, /sys,
# /dev, and stage 1 on capsule's boot-time marker port.
guest_init_common() {
    cat <<'COMMON'
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=linux
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# devtmpfs may already be mounted by the kernel (CONFIG_DEVTMPFS_MOUNT).
grep -q ' /dev devtmpfs ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
# Userspace reached: stage 1 on capsule's boot-time marker port (0x3c4 =
# 964); nothing happens where there is no such port or no /dev/port.
printf '\001' | dd of=/dev/port bs=1 seek=964 count=1 2>/dev/null
COMMON
}
