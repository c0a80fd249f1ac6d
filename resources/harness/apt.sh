# shellcheck shell=bash
# resources/harness/apt.sh: a private apt configuration for one more Debian
# suite (bookworm-backports, trixie sources, ...), derived from the Debian
# source the system's apt already has. Source it after resources/lib.sh.
#
# No registry address is written anywhere: the stanza is a copy of the one
# in /etc/apt/sources.list.d/debian.sources whose Suites name this
# machine's release (same URIs, same Signed-By), with only Suites and
# Types replaced. The system's apt configuration is not touched: the copy,
# its package lists and its download cache live in
# $CACHE/apt/<suite>-<types>/, and apt-get/apt-cache use it through
# APT_CONFIG. Works unprivileged (apt-get download, apt-get source
# --download-only, apt-cache).
#
#   private_apt SUITE TYPES   export APT_CONFIG for SUITE ("deb", "deb-src"
#                             or "deb deb-src"); runs `apt-get update` on it
#                             when its lists are missing or older than a day
#   debian_stanza SUITE TYPES print the derived deb822 stanza

# debian_stanza SUITE TYPES: the deb822 stanza of SUITE, derived from the
# system's Debian source (CAPSULE_APT_SOURCES, default
# /etc/apt/sources.list.d/debian.sources). Fails if there is no stanza for
# this machine's release.
debian_stanza() {
    local suite="$1" types="$2" sources="${CAPSULE_APT_SOURCES:-/etc/apt/sources.list.d/debian.sources}"
    local codename out
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    [[ -n "$codename" ]] || die "no VERSION_CODENAME in /etc/os-release"
    [[ -f "$sources" ]] || die "no $sources: cannot derive an apt source for $suite (this needs Debian's deb822 sources)"
    out="$(awk -v want="$codename" -v suite="$suite" -v types="$types" '
        BEGIN { RS = ""; FS = "\n" }
        {
            ok = 0
            for (i = 1; i <= NF; i++)
                if ($i ~ /^Suites:/) {
                    n = split(substr($i, 8), s, " ")
                    for (j = 1; j <= n; j++) if (s[j] == want) ok = 1
                }
            if (!ok || done) next
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^#/) continue
                if ($i ~ /^Suites:/) print "Suites: " suite
                else if ($i ~ /^Types:/) print "Types: " types
                else print $i
            }
            done = 1
        }' "$sources")"
    [[ -n "$out" ]] || die "$sources has no stanza with Suites: $codename: cannot derive one for $suite"
    printf '%s\n' "$out"
}

# private_apt SUITE TYPES: see the header.
private_apt() {
    local suite="$1" types="$2" dir stanza age
    dir="$(capsule_cache_root)/apt/$suite-${types// /+}"
    mkdir -p "$dir/sources" "$dir/lists/partial" "$dir/cache/archives/partial"
    stanza="$(debian_stanza "$suite" "$types")" || exit 1
    # Rewritten only when it changed: concurrent users read the same file.
    if [[ "$(cat "$dir/sources/capsule.sources" 2>/dev/null)" != "$stanza" ]]; then
        printf '%s\n' "$stanza" >"$dir/sources/.new.$$"
        mv "$dir/sources/.new.$$" "$dir/sources/capsule.sources"
        rm -f "$dir/updated"
    fi
    cat >"$dir/apt.conf.$$" <<EOF
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$dir/sources";
Dir::State::Lists "$dir/lists";
Dir::Cache "$dir/cache";
EOF
    # The cache is under root's home, which apt's download user (_apt)
    # cannot reach: root downloads itself.
    if [[ $(id -u) -eq 0 ]]; then
        echo 'APT::Sandbox::User "root";' >>"$dir/apt.conf.$$"
    fi
    mv "$dir/apt.conf.$$" "$dir/apt.conf"
    export APT_CONFIG="$dir/apt.conf"
    age=$(($(date +%s) - $(stat -c %Y "$dir/updated" 2>/dev/null || echo 0)))
    if [[ $age -gt 86400 ]]; then
        log "apt-get update for $suite ($types), private lists in $dir"
        # One updater at a time; the others wait and then find it fresh.
        (
            flock 9
            age=$(($(date +%s) - $(stat -c %Y "$dir/updated" 2>/dev/null || echo 0)))
            if [[ $age -gt 86400 ]]; then
                apt-get -q update >&2 ||
                    die "apt-get update of the private $suite source failed"
                touch "$dir/updated"
            fi
        ) 9>"$dir/lock" || exit 1
    fi
}
