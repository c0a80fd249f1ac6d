# shellcheck shell=sh
# tests/boot/durability-lib.sh: the crash-durability trials' writer and
# checker (issue #20, item 4), shared by the boot case durability_kill9
# (tests/boot/cases.d/durability.sh, in L1's busybox sh) and by
# resources/durability.sh (on the host, which checks the images of killed
# L1s). POSIX sh; busybox- and coreutils-compatible tools only.
#
# The record layout: the disk has DURABILITY_SLOTS slots of 4 KiB; record N
# (0 <= N < DURABILITY_RECORDS) belongs in slot N and is the 8-byte line
# "%07d\n" of N repeated 512 times. A record contains no zero byte.

# shellcheck disable=SC2016  # $n etc. in the guest command are for the guest shell
DURABILITY_SLOTS=512
DURABILITY_RECORDS=400

# The awk program that prints records 0..DURABILITY_RECORDS-1 back to back
# (one process: 8 bytes doubled 9 times is 4 KiB).
DURABILITY_GEN_AWK='BEGIN { for (n = 0; n < 400; n++) { r = sprintf("%07d\n", n); for (k = 0; k < 9; k++) r = r r; printf "%s", r } }'

# The guest's writer, typed on its serial console: all records are made
# once in the guest's tmpfs, then each is written to slot N of /dev/vda
# with O_DIRECT and fsync (dd oflag=direct conv=fsync: the write, then a
# virtio-blk FLUSH, which capsule carries to the image with fdatasync
# unless the disk is cache=unsafe), and `ack N` is printed only after dd
# returned successfully.
# shellcheck disable=SC2034  # used by the scripts that source this file
DURABILITY_WRITER="awk '$DURABILITY_GEN_AWK' >/tmp/recs; n=0; while [ \$n -lt $DURABILITY_RECORDS ]; do dd if=/tmp/recs of=/dev/vda bs=4096 skip=\$n seek=\$n count=1 oflag=direct conv=notrunc,fsync 2>/dev/null || break; echo \"ack \$n\"; n=\$((n+1)); done; echo writer-stopped-\$((1+1))"

# rand N: a random number in 0..N-1.
rand() {
    echo $(($(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % $1))
}

# durability_check IMAGE LAST DIR: checks IMAGE against the last
# acknowledged record LAST (-1: none) and adds to LOST and TORN. A slot at
# or below LAST must hold its record (else it is lost, and torn as well if
# it is not all zeros); a slot above LAST must hold its record or zeros
# (else it is torn). The slots in error are named on stderr. DIR keeps the
# records between calls, and scratch files.
#
# How: `cmp -l` lists the bytes where IMAGE differs from the image the
# guest was told it wrote (records 0..LAST, zeros after), one line each
# ("offset image-byte expected-byte", offsets from 1, bytes in octal); awk
# judges each slot with a difference. Since no record has a zero byte, a
# slot that differs from its record in all 4096 bytes, each a zero in
# IMAGE, is all zeros; a slot beyond LAST (expected zeros) is its own
# record if all 4096 bytes differ and each is that record's byte.
durability_check() {
    mkdir -p "$3"
    if [ ! -s "$3/records" ]; then
        awk "$DURABILITY_GEN_AWK" >"$3/records" || return 1
    fi
    _acked=$((($2 + 1) * 4096))
    { head -c "$_acked" "$3/records" && head -c $((DURABILITY_SLOTS * 4096 - _acked)) /dev/zero; } >"$3/want" || return 1
    _size=$(wc -c <"$1")
    if [ "$_size" -ne $((DURABILITY_SLOTS * 4096)) ]; then
        echo "durability: the image has $_size bytes, not $((DURABILITY_SLOTS * 4096))" >&2
        TORN=$((TORN + 1))
        return 0
    fi
    _res=$(cmp -l "$1" "$3/want" 2>/dev/null | awk -v last="$2" -v records="$DURABILITY_RECORDS" '
        function judge() {
            if (slot < 0) return
            if (slot <= last) {
                lost++
                if (!(n == 4096 && zeros == n)) torn++
                print "durability: record " slot " was acknowledged but is not on the image" (n == 4096 && zeros == n ? "" : " (and the slot is not zeros: torn)")
            } else if (!(slot < records && n == 4096 && own == n)) {
                torn++
                print "durability: slot " slot " is torn (neither its record nor zeros)"
            }
        }
        {
            o = $1 - 1
            s = int(o / 4096)
            if (s != slot) { judge(); slot = s; n = 0; zeros = 0; own = 0 }
            n++
            b = 0
            for (k = 1; k <= length($2); k++) b = b * 8 + substr($2, k, 1)
            if (b == 0) zeros++
            p = o % 8
            want = (p == 7) ? 10 : 48 + substr(sprintf("%07d", s), p + 1, 1)
            if (b == want) own++
        }
        BEGIN { slot = -1 }
        END { judge(); print "result", lost + 0, torn + 0 }')
    printf '%s\n' "$_res" | grep -v '^result ' >&2
    _r=$(printf '%s\n' "$_res" | sed -n 's/^result //p')
    [ -n "$_r" ] || return 1
    LOST=$((LOST + ${_r% *}))
    TORN=$((TORN + ${_r#* }))
    rm -f "$3/want"
}
