#!/usr/bin/env bash
# resources/api-schemathesis.sh: Firecracker's own OpenAPI description
# (../shared/reference/firecracker-api.yaml, or FC_SPEC) driven against
# `capsule firecracker --api-sock` by Schemathesis, a schema-based API
# tester from PyPI that nobody here wrote: every operation, generated
# valid and invalid bodies, for SECONDS (default 150).
#
# Checks: no server error (5xx), every response's status, content type
# and body as the schema declares them. capsule runs as uid 65534 in a
# scratch directory, so the paths the generator invents for log, metrics
# and snapshot files cannot touch anything that matters; a small TCP ->
# Unix-socket relay (Python's asyncio) lets Schemathesis reach the socket.
# Schemathesis lives in a virtualenv under the cache
# ($CAPSULE_CACHE/venv-schemathesis), pinned.
#
# Usage: resources/api-schemathesis.sh [SECONDS]
# Prints Schemathesis's summary; exits with its status (0: no failure).
set -euo pipefail

# shellcheck source=resources/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

secs="${1:-150}"
version=4.32.5
root="$(cd "$CAPSULE_RESOURCES_DIR/.." && pwd)"
spec="${FC_SPEC:-$root/../shared/reference/firecracker-api.yaml}"
[[ -f "$spec" ]] || spec=/work/shared/reference/firecracker-api.yaml
[[ -f "$spec" ]] || die "Firecracker's API spec not found (set FC_SPEC)"

venv="$(capsule_cache_root)/venv-schemathesis"
if [[ ! -x "$venv/bin/schemathesis" ]] || ! "$venv/bin/schemathesis" --version | grep "$version" >/dev/null; then
    log "installing schemathesis $version into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "schemathesis==$version"
fi

log "building capsule"
(cd "$root" && cargo build -q --bin capsule)
bin="$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug/capsule"

work="$(mktemp -d)"
chmod 755 "$work"
mkdir "$work/run"
cp "$bin" "$work/capsule"
chown 65534:65534 "$work/run"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

(cd "$work/run" && exec setpriv --reuid=65534 --regid=65534 --clear-groups \
    "$work/capsule" firecracker --api-sock "$work/run/api.sock") \
    >"$work/capsule.out" 2>"$work/capsule.err" &
pids+=($!)
cat >"$work/relay.py" <<'EOF'
import asyncio, sys

async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()

async def handle(cr, cw):
    try:
        ur, uw = await asyncio.open_unix_connection(sys.argv[1])
    except OSError:
        cw.close()
        return
    await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
EOF
for _ in $(seq 50); do [[ -S "$work/run/api.sock" ]] && break; sleep 0.1; done
[[ -S "$work/run/api.sock" ]] || die "capsule did not open its API socket: $(cat "$work/capsule.err")"
coproc RELAY { python3 "$work/relay.py" "$work/run/api.sock"; }
pids+=("$RELAY_PID")
read -r port <&"${RELAY[0]}"

log "schemathesis $version: $spec against capsule $("$bin" --version | head -n1), $secs s"
status=0
"$venv/bin/schemathesis" run "$spec" --url "http://127.0.0.1:$port" -w 1 \
    --max-time "$secs" \
    -c not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance ||
    status=$?
if ! kill -0 "${pids[0]}" 2>/dev/null; then
    echo "capsule ended during the run: $(tail -n 3 "$work/capsule.err")"
    status=1
fi
exit "$status"
