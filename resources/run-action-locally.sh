#!/bin/sh
# resources/run-action-locally.sh: run the steps of capsule's GitHub Action
# (action.yml) here, in order, as GitHub's runner would, since GitHub
# cannot be reached from the project's machines.
#
# POSIX sh and awk only (it also runs in the nested harness's busybox L1).
# It reads action.yml's inputs (defaults, required) and its composite
# steps, then for each `run` step: substitutes `${{ inputs.X }}`,
# `${{ github.X }}` and `${{ steps.ID.outputs.X }}` in its `env`, exports
# that env, runs the script with `bash --noprofile --norc -eo pipefail`
# (plain `sh -e` where there is no bash), and applies what the step wrote
# to $GITHUB_OUTPUT, $GITHUB_ENV and $GITHUB_PATH. `uses` steps (the
# cache) are GitHub's own and are skipped, with a note; their outputs are
# empty. It stops at the first failing step and exits with its status.
#
# Usage: resources/run-action-locally.sh [-C DIR] [--input NAME=VALUE ...]
#   -C DIR        the directory holding action.yml (default: the repository)
#   --input N=V   an input (repeatable); V may hold newlines (for `share`)
# Env: RUNNER_TEMP (default: a fresh temporary directory)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
action_dir="$here/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/capsule-action.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/given" "$work/ctx" "$work/steps"

die() {
    echo "run-action-locally: $*" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        -C) action_dir="$2"; shift 2 ;;
        --input)
            name="${2%%=*}"
            [ "$name" != "$2" ] || die "--input needs NAME=VALUE, not '$2'"
            printf '%s' "${2#*=}" >"$work/given/$name"
            shift 2
            ;;
        *) die "unknown argument '$1'" ;;
    esac
done
action_dir=$(cd "$action_dir" && pwd)
yml="$action_dir/action.yml"
[ -f "$yml" ] || die "no action.yml in $action_dir"

# unquote VALUE: YAML's plain, 'single' ('' is a quote) or "double" scalar.
# Writes files under $work: inputs/NAME/{default,required}, and for step N
# (in order, 01, 02, ...) steps/N/{name,id,uses,shell,run} and
# steps/N/env/KEY.
awk -v out="$work" '
function unquote(v,   q, n) {
    sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v)
    q = sprintf("%c", 39); n = length(v)
    if (n >= 2 && substr(v, 1, 1) == q && substr(v, n, 1) == q) {
        v = substr(v, 2, n - 2); gsub(q q, q, v)
    } else if (n >= 2 && substr(v, 1, 1) == "\"" && substr(v, n, 1) == "\"") {
        v = substr(v, 2, n - 2)
    }
    return v
}
function put(path, v) { printf "%s", v > path; close(path) }
function indent(s) { match(s, /^ */); return RLENGTH }
BEGIN { section = ""; n = 0; inblock = 0 }
{
    line = $0
    if (inblock) {
        if (line ~ /^[ \t]*$/ || indent(line) > blockind) {
            if (line ~ /^[ \t]*$/) print "" >> blockfile
            else print substr(line, blockind + 3) >> blockfile
            next
        }
        close(blockfile); inblock = 0
    }
    if (line ~ /^[ \t]*#/ || line ~ /^[ \t]*$/) next
    ind = indent(line)
    if (ind == 0) { section = line; sub(/:.*/, "", section); next }
    if (section == "inputs") {
        if (ind == 2) {
            input = line; sub(/^ +/, "", input); sub(/:.*/, "", input)
            system("mkdir -p \"" out "/inputs/" input "\"")
            put(out "/inputs/" input "/default", "")
        } else if (ind == 4 && line ~ /^ +default:/) {
            v = line; sub(/^ +default:/, "", v); put(out "/inputs/" input "/default", unquote(v))
        } else if (ind == 4 && line ~ /^ +required: *true/) {
            put(out "/inputs/" input "/required", "true")
        }
        next
    }
    if (section != "runs") next
    if (line ~ /^    - /) {
        n++; dir = sprintf("%s/steps/%02d", out, n)
        system("mkdir -p \"" dir "/env\"")
        sub(/^    - /, "      ", line); ind = 6; map = ""
    }
    if (n == 0) next
    if (ind == 6) {
        key = line; sub(/^ +/, "", key); sub(/:.*/, "", key)
        v = line; sub(/^ +[A-Za-z0-9_-]+:/, "", v)
        if (key == "env" || key == "with") { map = key; next }
        map = ""
        if (key == "run" && v ~ /^ *[|>]-? *$/) {
            inblock = 1; blockind = 6; blockfile = dir "/run"; printf "" > blockfile
            next
        }
        put(dir "/" key, unquote(v))
    } else if (ind == 8 && map == "env") {
        key = line; sub(/^ +/, "", key); sub(/:.*/, "", key)
        v = line; sub(/^ +[A-Za-z0-9_]+:/, "", v)
        put(dir "/env/" key, unquote(v))
    }
}
' "$yml"

# Inputs: given, else the default; a required one must not end up empty.
for d in "$work"/inputs/*/; do
    name=$(basename "$d")
    if [ -f "$work/given/$name" ]; then
        cp "$work/given/$name" "$work/ctx/inputs.$name"
        rm "$work/given/$name"
    else
        cp "$d/default" "$work/ctx/inputs.$name"
    fi
    if [ -f "$d/required" ] && [ ! -s "$work/ctx/inputs.$name" ]; then
        die "input '$name' is required"
    fi
done
for f in "$work"/given/*; do
    [ -e "$f" ] || continue
    die "action.yml has no input '$(basename "$f")'"
done

# What GitHub's runner provides.
runner_temp="${RUNNER_TEMP:-$work/runner-temp}"
mkdir -p "$runner_temp"
printf '%s' "$action_dir" >"$work/ctx/github.action_path"
: >"$work/ctx/github.action_ref"
: >"$work/ctx/github.action_repository"
printf '%s' "${GITHUB_SERVER_URL:-}" >"$work/ctx/github.server_url"
export RUNNER_TEMP="$runner_temp" GITHUB_ACTION_PATH="$action_dir"
export RUNNER_OS=Linux GITHUB_ACTIONS=false

# subst FILE: its text with each ${{ EXPR }} replaced by the file
# $work/ctx/EXPR (a missing step output is empty, as on GitHub; any other
# unknown expression is an error).
subst() {
    awk -v ctx="$work/ctx" '
    BEGIN { RS = "\001" }
    {
        s = $0; res = ""
        while (match(s, /\$\{\{ *[A-Za-z0-9_.-]+ *\}\}/)) {
            expr = substr(s, RSTART + 3, RLENGTH - 5); gsub(/ /, "", expr)
            f = ctx "/" expr; val = ""
            if (system("test -e \"" f "\"") != 0) {
                if (expr !~ /^steps\./) {
                    print "run-action-locally: unknown expression ${{ " expr " }}" > "/dev/stderr"
                    exit 3
                }
            } else {
                first = 1
                while ((getline l < f) > 0) { val = val (first ? "" : "\n") l; first = 0 }
                close(f)
            }
            res = res substr(s, 1, RSTART - 1) val
            s = substr(s, RSTART + RLENGTH)
        }
        printf "%s", res s
    }' "$1"
}

if command -v bash >/dev/null 2>&1; then
    run_shell() { bash --noprofile --norc -eo pipefail "$1"; }
else
    run_shell() { sh -e "$1"; }
fi

for step in "$work"/steps/*/; do
    name=$(cat "$step/name" 2>/dev/null || basename "$step")
    id=$(cat "$step/id" 2>/dev/null || true)
    if [ -f "$step/uses" ]; then
        echo "==> $name: skipped (uses: $(cat "$step/uses") runs only on GitHub)"
        continue
    fi
    [ -f "$step/run" ] || die "step '$name' has neither run nor uses"
    echo "==> $name"
    out="$work/out" envf="$work/env" pathf="$work/path"
    : >"$out"
    : >"$envf"
    : >"$pathf"
    status=0
    (
        for e in "$step"/env/*; do
            [ -e "$e" ] || continue
            val=$(subst "$e") || exit 3
            export "$(basename "$e")=$val"
        done
        export GITHUB_OUTPUT="$out" GITHUB_ENV="$envf" GITHUB_PATH="$pathf"
        run_shell "$step/run"
    ) || status=$?
    if [ "$status" -ne 0 ]; then
        echo "==> $name: failed with status $status"
        exit "$status"
    fi
    if [ -n "$id" ]; then
        while IFS= read -r l; do
            case "$l" in *=*) printf '%s' "${l#*=}" >"$work/ctx/steps.$id.outputs.${l%%=*}" ;; esac
        done <"$out"
    fi
    while IFS= read -r l; do
        case "$l" in *=*) export "${l%%=*}=${l#*=}" ;; esac
    done <"$envf"
    while IFS= read -r l; do
        [ -z "$l" ] || PATH="$l:$PATH"
    done <"$pathf"
    export PATH
done
echo "==> all steps passed"
