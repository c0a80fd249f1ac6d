# shellcheck shell=sh
# tests/boot/cases.d/virtiofs.sh: virtio-fs boot cases (sourced by cases.sh).
#
# capsule starts a virtiofsd for each --fs: the Rust virtiofsd that
# tests/boot/run.sh builds (resources/build-virtiofsd.sh) and ships in
# $TOOLS/virtiofsd/ (its shared libraries beside it). In L1 the root is the
# initial ramfs, where virtiofsd's default sandbox (pivot_root in a new
# mount namespace) is refused by the kernel: there the cases ask for its
# chroot sandbox (CAPSULE_VIRTIOFSD_SANDBOX=chroot).
#
# Variables a case reads after run_capsule/run_exec must not be one of
# theirs (`_dir`, `_in`, `_raw`...: sh has no locals): the share is `_vfs`.
#
# Liveness is checked while the VM runs: a background job on the host
# watches the guest console for a marker, then looks at the shared
# directory and answers with a file the guest waits for.

# shellcheck disable=SC2016  # $(...) in case inputs is for the guest shell
ALL_CASES="$ALL_CASES virtiofs_live virtiofs_ro exec_share_live exec_share_file exec_host_root"

# virtiofs_prereqs: a virtiofsd in $TOOLS, else the case fails (it must not
# pass without running); exports CAPSULE_VIRTIOFSD and the sandbox, which
# virtiofs_done takes back (other cases, e.g. exec_share, run without a
# virtiofsd: copy mode).
virtiofs_done() { unset CAPSULE_VIRTIOFSD CAPSULE_VIRTIOFSD_SANDBOX; }
# no_capsule_error: a run that went well printed no `capsule: error:` (a
# false "backend closed its socket" once did, on every run).
no_capsule_error() { ! grep -q '^capsule: error:' "$ERR"; }
virtiofs_prereqs() {
    if [ -n "${TOOLS:-}" ] && [ -x "$TOOLS/virtiofsd/virtiofsd" ]; then
        export CAPSULE_VIRTIOFSD="$TOOLS/virtiofsd/virtiofsd"
        if [ "$(awk '$2 == "/" { print $3; exit }' /proc/mounts)" = rootfs ]; then
            export CAPSULE_VIRTIOFSD_SANDBOX=chroot
        fi
        return 0
    fi
    CASE_ERRORS="not run: no virtiofsd in \$TOOLS/virtiofsd (tests/boot/run.sh ships it)"
    SECS=0 RC=1 OUT=/dev/null ERR=/dev/null
    return 1
}

# virtiofs_answer CASE DIR: in the background, once CASE's console shows
# `guest-wrote-2`, write what the host then sees in DIR/g.txt (plus
# " seen-by-host") to DIR/ack.txt, a file that appears after boot.
virtiofs_answer() {
    (
        _raw="$WORK/$1/stdout.raw"
        _i=0
        while [ $_i -lt 900 ]; do
            if [ -f "$_raw" ] && tr -d '\r' <"$_raw" | grep -qx 'guest-wrote-2'; then
                echo "$(cat "$2/g.txt" 2>/dev/null) seen-by-host" >"$2/ack.tmp"
                mv "$2/ack.tmp" "$2/ack.txt"
                exit 0
            fi
            sleep 0.2 2>/dev/null || sleep 1
            _i=$((_i + 1))
        done
    ) &
    VIRTIOFS_ANSWER_PID=$!
}

case_virtiofs_live() {
    virtiofs_prereqs || return
    _vfs="$WORK/virtiofs_live.share"
    rm -rf "$_vfs"
    mkdir -p "$_vfs/sub"
    echo "made-on-host-before-boot" >"$_vfs/pre.txt"
    # run_capsule removes the case's directory first: the watcher starts
    # after that has happened (it only reads stdout.raw).
    virtiofs_answer virtiofs_live "$_vfs"
    run_capsule virtiofs_live 'mkdir -p /mnt/s && mount -t virtiofs share /mnt/s && echo mounted-$((1+1))
cat /mnt/s/pre.txt
echo guestdata-$((40+2)) >/mnt/s/g.txt && echo guest-wrote-$((1+1))
i=0; while [ ! -f /mnt/s/ack.txt ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; cat /mnt/s/ack.txt
mv /mnt/s/g.txt /mnt/s/sub/renamed.txt && rm /mnt/s/pre.txt && echo changed-$((1+1))
ls /mnt/s /mnt/s/sub | tr "\n" " "; echo; echo listed-$((1+1))
poweroff -f' \
        run --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 1 --memory 256M --fs "$_vfs:share"
    kill "$VIRTIOFS_ANSWER_PID" 2>/dev/null
    virtiofs_done
    expect "exit status 0" rc_is 0
    expect "the guest mounted the share" out_has_line "mounted-2"
    expect "the guest read the host's file" out_has_line "made-on-host-before-boot"
    expect "the host saw the guest's file while the VM ran, the guest saw the host's answer made after boot" \
        out_has_line "guestdata-42 seen-by-host"
    expect "the guest's rename reached the host" \
        test "$(cat "$_vfs/sub/renamed.txt" 2>/dev/null)" = "guestdata-42"
    expect "the guest's deletion reached the host" test ! -e "$_vfs/pre.txt"
    expect "no copy of the old name is left" test ! -e "$_vfs/g.txt"
    expect "no error from capsule" no_capsule_error
    expect "no Rust panic" no_rust_panic
}

case_virtiofs_ro() {
    virtiofs_prereqs || return
    _vfs="$WORK/virtiofs_ro.share"
    rm -rf "$_vfs"
    mkdir -p "$_vfs"
    echo "read-only-content" >"$_vfs/keep.txt"
    run_capsule virtiofs_ro 'mkdir -p /mnt/s && mount -t virtiofs ro /mnt/s && echo mounted-$((1+1))
cat /mnt/s/keep.txt
echo x >/mnt/s/new.txt || echo create-refused-$((1+1))
echo x >>/mnt/s/keep.txt || echo append-refused-$((1+1))
rm /mnt/s/keep.txt || echo rm-refused-$((1+1))
mount -o remount,rw /mnt/s; echo y >/mnt/s/new2.txt || echo remount-write-refused-$((1+1))
poweroff -f' \
        run --kernel "$BZIMAGE" --initrd "$INITRD" --cpus 1 --memory 256M --fs "$_vfs:ro,ro"
    virtiofs_done
    expect "exit status 0" rc_is 0
    expect "the guest mounted the share" out_has_line "mounted-2"
    expect "the guest read the file" out_has_line "read-only-content"
    expect "creating a file fails" out_has_line "create-refused-2"
    expect "appending fails" out_has_line "append-refused-2"
    expect "deleting fails" out_has_line "rm-refused-2"
    expect "a guest remount rw does not help" out_has_line "remount-write-refused-2"
    expect "the host directory is unchanged" \
        test "$(ls "$_vfs")" = "keep.txt" -a "$(cat "$_vfs/keep.txt")" = "read-only-content"
    expect "no error from capsule" no_capsule_error
    expect "no Rust panic" no_rust_panic
}

# `capsule exec --share` with a virtiofsd: live, not copied. While the
# command runs, the host's watcher sees the file it wrote and answers; the
# command's deletion and rename are on the host afterwards. The command
# writes g.tmp and renames it: a watcher polling for g.txt could otherwise
# see the file between its creation and its write, and read it empty.
case_exec_share_live() {
    virtiofs_prereqs || return
    _d="$WORK/exec_share_live.share"
    rm -rf "$_d"
    mkdir -p "$_d"
    echo "delete me" >"$_d/del.txt"
    echo "rename me" >"$_d/a.txt"
    (
        _i=0
        while [ ! -f "$_d/g.txt" ] && [ $_i -lt 900 ]; do
            sleep 0.2 2>/dev/null || sleep 1
            _i=$((_i + 1))
        done
        echo "$(cat "$_d/g.txt" 2>/dev/null) seen-by-host" >"$_d/ack.tmp"
        mv "$_d/ack.tmp" "$_d/ack.txt"
    ) &
    _watcher=$!
    # The command needs a shell: the root image's (capsule's own init has none).
    # shellcheck disable=SC2046  # word splitting of the fixed prefix is wanted
    run_exec exec_share_live /dev/null $(EXEC_DISK_ARGS) --share "$_d:/s" -w /s \
        -- sh -c 'echo guest-42 >g.tmp; mv g.tmp g.txt; i=0; while [ ! -f ack.txt ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done;
                  cat ack.txt; rm del.txt; mv a.txt b.txt'
    kill "$_watcher" 2>/dev/null
    virtiofs_done
    expect "exit status 0" rc_is 0
    expect "the host saw the command's file while it ran, the command saw the answer" \
        out_is "guest-42 seen-by-host"
    expect "the deletion reached the host" test ! -e "$_d/del.txt"
    expect "the rename reached the host" test "$(cat "$_d/b.txt" 2>/dev/null)" = "rename me" -a ! -e "$_d/a.txt"
    expect "no copy-mode fallback" test "$(grep -c 'falls back to copying' "$ERR")" -eq 0
    expect "no Rust panic" no_rust_panic
}

# `capsule exec --share HOSTFILE:GUESTFILE` and `--tmpfs` (issue 24, what
# the containerd shim gives for a container's resolv.conf and tmpfs
# mounts): a read-only file over a path the root image does not have, a
# writable one whose write reaches the host file, a tmpfs with its
# options; `..` in a guest path stays in the root.
case_exec_share_file() {
    virtiofs_prereqs || return
    _d="$WORK/exec_share_file.files"
    rm -rf "$_d"
    mkdir -p "$_d"
    echo 'nameserver 10.9.8.7' >"$_d/ro.txt"
    : >"$_d/rw.txt"
    # shellcheck disable=SC2046  # word splitting of the fixed prefix is wanted
    run_exec exec_share_file /dev/null $(EXEC_DISK_ARGS) --share "$_d/ro.txt:/etc/../../capsule-ro:ro" \
        --share "$_d/rw.txt:/var/log/capsule-rw" --tmpfs /scratch:size=1m,mode=700,nosuid \
        -- sh -c 'cat /capsule-ro; echo x 2>/dev/null >>/capsule-ro || echo ro-refused
                  echo from-guest >/var/log/capsule-rw; grep " /scratch " /proc/mounts; ls -ld /scratch'
    virtiofs_done
    expect "exit status 0" rc_is 0
    expect "the read-only file is the host's, at /capsule-ro" out_has_line 'nameserver 10.9.8.7'
    expect "and read-only" out_has_line ro-refused
    expect "the host's read-only file is unchanged" test "$(cat "$_d/ro.txt")" = 'nameserver 10.9.8.7'
    expect "the writable file's write reached the host" test "$(cat "$_d/rw.txt")" = from-guest
    expect "/scratch is a tmpfs of 1 MiB, nosuid" out_has ' /scratch tmpfs .*nosuid.*size=1024k'
    expect "/scratch has mode 700" out_has '^drwx------ .* /scratch$'
    expect "no Rust panic" no_rust_panic
}

# `capsule exec --host-root`: the command runs on the host's / (here L1's),
# read-only under a tmpfs overlay, in the current directory, which is
# shared writable. /bin/true and a host tool that is not in capsule's
# initramfs ($TOOLS/debugfs, with its own libraries) run from the host.
case_exec_host_root() {
    virtiofs_prereqs || return
    _cwd="$WORK/exec_host_root.cwd"
    rm -rf "$_cwd"
    mkdir -p "$_cwd"
    _old="$(pwd)"
    cd "$_cwd" || return
    run_exec exec_host_root_true /dev/null exec --kernel "$BZIMAGE" --host-root -- /bin/true
    _true_rc=$RC
    _marker="/etc/capsule-overlay-test-$$"
    run_exec exec_host_root /dev/null exec --kernel "$BZIMAGE" --host-root \
        -- sh -c "$TOOLS/debugfs -V 2>&1 | head -n 1; echo x >$_marker && echo overlay-write-ok; pwd; echo made-in-guest >out.txt;
                  $TOOLS/git init -q . && $TOOLS/git add out.txt && $TOOLS/git status --short | sed 's/^/git: /'"
    cd "$_old" || return
    virtiofs_done
    expect "/bin/true from the host root: status 0" [ "$_true_rc" -eq 0 ]
    expect "exit status 0" rc_is 0
    expect "a host binary not in capsule's initramfs ran" out_has "debugfs"
    expect "writes go to the overlay" out_has "overlay-write-ok"
    expect "the overlay did not write the host's /etc" test ! -e "$_marker"
    expect "the working directory is the host's current directory" out_has "^$_cwd\$"
    expect "the current directory is writable and shared" \
        test "$(cat "$_cwd/out.txt" 2>/dev/null)" = "made-in-guest"
    expect "git works on the shared tree (in the guest, then on the host)" \
        sh -c "grep -qx 'git: A  out.txt' '$OUT' && cd '$_cwd' && '$TOOLS/git' status --short | grep -qx 'A  out.txt'"
    expect "no Rust panic" no_rust_panic
}

# `capsule exec` with Debian's stock cloud kernel, whose virtio-mmio,
# console, virtio-fs and overlayfs are modules: `--modules` gives the
# kernel's own /lib/modules tree (taken out of the Debian image with
# debugfs), the init loads them, and the command runs on the host root.
# Optional (run by name) like the other Debian cases: it needs the Debian
# image (resources/build-debian-image.sh) carried into L1.
OPTIONAL_CASES="${OPTIONAL_CASES:-} debian_exec_modules"

case_debian_exec_modules() {
    debian_prereqs || return
    virtiofs_prereqs || return
    _rel="$(cat "$DEBIAN_IMAGE/release")"
    _mods="$WORK/debian_exec_modules.lib"
    rm -rf "$_mods"
    mkdir -p "$_mods"
    "$TOOLS/debugfs" -R "rdump /lib/modules/$_rel $_mods" "$DEBIAN_IMAGE/debian.ext4" >/dev/null 2>&1
    if [ ! -f "$_mods/$_rel/modules.dep" ]; then
        CASE_ERRORS="not run: cannot take /lib/modules/$_rel out of the Debian image"
        SECS=0 RC=1 OUT=/dev/null ERR=/dev/null
        return
    fi
    _cwd="$WORK/debian_exec_modules.cwd"
    rm -rf "$_cwd"
    mkdir -p "$_cwd"
    _old="$(pwd)"
    cd "$_cwd" || return
    run_exec debian_exec_modules /dev/null exec --kernel "$DEBIAN_IMAGE/vmlinuz" \
        --modules "$_mods/$_rel" --host-root --memory 512M \
        -- sh -c 'uname -r; cut -d" " -f1 /proc/modules | sort | tr "\n" " "; echo; echo ran >ran.txt'
    cd "$_old" || return
    virtiofs_done
    expect "exit status 0" rc_is 0
    expect "the Debian kernel ran the command" out_has "^$_rel\$"
    expect "virtio_mmio, virtio_console, virtiofs and overlay were loaded as modules" \
        sh -c "grep -q 'virtio_mmio' '$OUT' && grep -q 'virtio_console' '$OUT' && grep -q 'virtiofs' '$OUT' && grep -q 'overlay' '$OUT'"
    expect "the working directory is shared" test "$(cat "$_cwd/ran.txt" 2>/dev/null)" = ran
    expect "no Rust panic" no_rust_panic
}
