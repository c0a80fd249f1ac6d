#!/usr/bin/env bash
# resources/harness/mode.sh: decide how real Linux guests are run here.
#
#   direct  the host's /dev/kvm is hardware KVM (/dev/kvm exists, kvm_intel
#           or kvm_amd is loaded and kvm_pvm is not): run capsule directly.
#   nested  anything else (e.g. PVM, or no /dev/kvm): run capsule inside an
#           L1 Linux guest under QEMU TCG with emulated SVM
#           (resources/harness/run-in-l1.sh).
# CAPSULE_HARNESS=direct|nested overrides the detection.
#
# Usage: resources/harness/mode.sh
# Prints the mode on stdout.
set -euo pipefail

case "${CAPSULE_HARNESS:-}" in
direct | nested)
    echo "$CAPSULE_HARNESS"
    exit 0
    ;;
"") ;;
*)
    echo "mode.sh: CAPSULE_HARNESS must be 'direct' or 'nested', not '$CAPSULE_HARNESS'" >&2
    exit 2
    ;;
esac

if [[ -c /dev/kvm ]] &&
    { [[ -d /sys/module/kvm_intel ]] || [[ -d /sys/module/kvm_amd ]]; } &&
    [[ ! -d /sys/module/kvm_pvm ]]; then
    echo direct
else
    echo nested
fi
