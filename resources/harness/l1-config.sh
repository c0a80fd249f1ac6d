# shellcheck shell=bash
# resources/harness/l1-config.sh: which L1 the nested harness runs.
# Source it after resources/lib.sh. CAPSULE_L1 names the configuration:
#
#   qemu10-linux612  (default since 2026-12-05) QEMU 10.0 and Linux 6.12,
#                    both from bookworm-backports: 100 of 100 soak boots
#                    clean, the whole suite passed with no L1 failure and
#                    no case rerun, guests boot in 0.82x the time of
#                    qemu7-linux61 (docs/harness.md)
#   qemu10-linux61   QEMU 10.0, Debian 12's Linux 6.1
#   qemu7-linux612   Debian 12's QEMU 7.2, Linux 6.12
#   qemu7-linux61    Debian 12's QEMU 7.2 and Linux 6.1: the default until
#                    2026-12-05 (about one L1 hang or death per suite run)
#
# Sets L1_CONFIG (the name), L1_QEMU (7 or 10) and L1_LINUX (61 or 612).

L1_CONFIG="${CAPSULE_L1:-qemu10-linux612}"
case "$L1_CONFIG" in
qemu7-linux61 | qemu7-linux612 | qemu10-linux61 | qemu10-linux612) ;;
*) die "CAPSULE_L1 must be one of qemu10-linux612, qemu10-linux61, qemu7-linux612, qemu7-linux61, not '$L1_CONFIG'" ;;
esac
L1_QEMU="${L1_CONFIG%%-*}"
L1_QEMU="${L1_QEMU#qemu}"
L1_LINUX="${L1_CONFIG##*-linux}"
