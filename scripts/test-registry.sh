#!/usr/bin/env bash
# A local OCI registry for the image tests and benchmark: Debian's docker-registry on
# 127.0.0.1, storage in a temporary directory, plus the test images pushed with skopeo.
#
#   scripts/test-registry.sh start [--port N] [--watch PID] [--no-fixtures] [--auth USER:PASS]
#       starts a registry, waits until it answers, pushes the fixtures, and prints
#       `PORT=<port>` and `DIR=<state dir>` (stdout, one per line). With --watch, the registry
#       is stopped and its directory removed once process PID exits. With --auth, it requires
#       HTTP basic authentication (htpasswd, bcrypt) and gets no fixtures.
#   scripts/test-registry.sh stop DIR       stops it and removes DIR
#   scripts/test-registry.sh fixtures PORT  builds and pushes the fixtures to a running registry
#   scripts/test-registry.sh python-layout  builds (once, cached) the python OCI layout; prints it
#
# Fixtures (repository names on the registry):
#   test/busybox:latest   3 layers (gzip, gzip, zstd), OCI media types: whiteouts, an opaque
#                         directory, hard links, symlinks (also written through), a device node,
#                         a FIFO, setuid and non-root ownership; config Env/Cmd/WorkingDir/User
#   test/busybox:docker   layers 1-2 as Docker v2 schema 2 (skopeo --format v2s2)
#   test/busybox:multi    an OCI index: linux/arm64 first, then linux/amd64
#   library/python:3.12   Debian bookworm minbase + python3-minimal (debootstrap), 3 gzip layers,
#                         built once and cached in ~/.cache/smol/test-images keyed by its inputs
#
# Needs (Debian): docker-registry skopeo umoci erofs-utils e2fsprogs debootstrap zstd jq
# busybox-static.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_ROOT="${SMOL_CACHE:-$HOME/.cache/smol}/test-images"
MIRROR="${SMOL_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

die() { echo "test-registry: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found (Debian: apt-get install $2)"; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A port below the kernel's ephemeral range (whose ports any outgoing connection may take
# between this check and the registry's bind), free now.
free_port() {
    local p low=32768
    [ -r /proc/sys/net/ipv4/ip_local_port_range ] && read -r low _ </proc/sys/net/ipv4/ip_local_port_range
    [ "$low" -gt 21000 ] || low=32768
    for _ in $(seq 1 200); do
        p=$(( 20000 + RANDOM % (low - 20000) ))
        port_in_use "$p" || { echo "$p"; return 0; }
    done
    die "no free port"
}

# ---- OCI layout helpers -------------------------------------------------------------------

# add_blob LAYOUT FILE -> prints "sha256:<hex> <size>" and moves FILE into the layout.
add_blob() {
    local layout=$1 file=$2 hex size
    hex=$(sha256sum "$file" | cut -d' ' -f1)
    size=$(stat -c %s "$file")
    mkdir -p "$layout/blobs/sha256"
    mv -f "$file" "$layout/blobs/sha256/$hex"
    echo "sha256:$hex $size"
}

# add_json LAYOUT JSON -> like add_blob, for a JSON document given as a string.
add_json() {
    local layout=$1 tmp
    tmp=$(mktemp "$layout/.json.XXXXXX")
    printf '%s' "$2" >"$tmp"
    add_blob "$layout" "$tmp"
}

init_layout() {
    mkdir -p "$1/blobs/sha256"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$1/oci-layout"
    [ -f "$1/index.json" ] || printf '{"schemaVersion":2,"manifests":[]}' >"$1/index.json"
}

# tag_layout LAYOUT TAG DIGEST SIZE MEDIATYPE [PLATFORM_JSON]
tag_layout() {
    local layout=$1 tag=$2 digest=$3 size=$4 mt=$5 tmp
    tmp=$(mktemp)
    jq --arg t "$tag" --arg d "$digest" --argjson s "$size" --arg m "$mt" \
        '.manifests = ([.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] != $t)]
          + [{mediaType: $m, digest: $d, size: $s,
              annotations: {"org.opencontainers.image.ref.name": $t}}])' \
        "$layout/index.json" >"$tmp"
    mv "$tmp" "$layout/index.json"
}

# layer DIR OUT COMPRESSOR [tar args...] -> writes OUT (compressed); prints the diff_id.
layer() {
    local dir=$1 out=$2 comp=$3; shift 3
    local raw="$out.tar"
    tar --format=pax --numeric-owner --sort=name --mtime=@1700000000 \
        --pax-option=delete=atime,delete=ctime -C "$dir" -cf "$raw" "$@"
    echo "sha256:$(sha256sum "$raw" | cut -d' ' -f1)"
    case $comp in
        gzip) gzip -n -6 -c "$raw" >"$out" ;;
        zstd) zstd -q -3 -c "$raw" >"$out" ;;
        none) cp "$raw" "$out" ;;
    esac
    rm -f "$raw"
}

# image LAYOUT TAG ARCH CONFIG_EXTRA_JSON LAYER... where LAYER is FILE|DIFFID|MEDIATYPE
# -> adds config + manifest, tags it; prints "digest size" of the manifest.
image() {
    local layout=$1 tag=$2 arch=$3 extra=$4; shift 4
    local diffs="" layers="" l f d m cfg cd cs md ms bd bs
    for l in "$@"; do
        IFS='|' read -r f d m <<<"$l"
        diffs="$diffs${diffs:+,}\"$d\""
        read -r bd bs < <(add_blob "$layout" "$f")
        layers="$layers${layers:+,}{\"mediaType\":\"$m\",\"digest\":\"$bd\",\"size\":$bs}"
    done
    cfg=$(jq -cn --arg a "$arch" --argjson extra "$extra" --argjson d "[$diffs]" \
        '{architecture:$a, os:"linux", config:$extra, rootfs:{type:"layers", diff_ids:$d},
          created:"2024-01-01T00:00:00Z"}')
    read -r cd cs < <(add_json "$layout" "$cfg")
    local man="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"$cd\",\"size\":$cs},\"layers\":[$layers]}"
    read -r md ms < <(add_json "$layout" "$man")
    [ -n "$tag" ] && tag_layout "$layout" "$tag" "$md" "$ms" application/vnd.oci.image.manifest.v1+json
    echo "$md $ms"
}

GZ=application/vnd.oci.image.layer.v1.tar+gzip
ZS=application/vnd.oci.image.layer.v1.tar+zstd

build_busybox() {
    local out=$1 w
    need busybox busybox-static; need zstd zstd; need jq jq
    w=$(mktemp -d)
    init_layout "$out"
    local bb; bb=$(command -v busybox)

    # Layer 1: the base.
    local s1="$w/l1"; mkdir -p "$s1"/{bin,etc,usr/lib,tmp,data,dir/opaque/sub,dir/gone-dir,home/user}
    cp "$bb" "$s1/bin/busybox"
    for a in sh ls cat echo uname id stat; do ln -s busybox "$s1/bin/$a"; done
    echo "motd from layer 1" >"$s1/etc/motd"
    echo "to be whited out" >"$s1/etc/remove-me"
    echo "lower a" >"$s1/dir/opaque/lower-a"
    echo "lower b" >"$s1/dir/opaque/sub/lower-b"
    echo "gone" >"$s1/dir/gone-dir/file"
    echo "original" >"$s1/data/original"
    ln "$s1/data/original" "$s1/data/hardlink"
    echo "in usr/lib" >"$s1/usr/lib/lower.txt"
    ln -s usr/lib "$s1/lib"
    ln -s /etc/motd "$s1/etc/motd-link"
    printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n' >"$s1/etc/passwd"
    printf 'root:x:0:\nuser:x:1000:\n' >"$s1/etc/group"
    chown 1000:1000 "$s1/home/user"
    chmod 1777 "$s1/tmp"
    local d1; d1=$(layer "$s1" "$w/l1.gz" gzip .)

    # Layer 2: whiteouts, an opaque directory, a write through an in-root symlink, new links.
    local s2="$w/l2"; mkdir -p "$s2"/{etc,dir/opaque,data,lib}
    : >"$s2/etc/.wh.remove-me"
    : >"$s2/dir/.wh.gone-dir"
    : >"$s2/dir/opaque/.wh..wh..opq"
    echo "upper c" >"$s2/dir/opaque/upper-c"
    echo "written through the lib symlink" >"$s2/lib/via-symlink.txt"
    echo "pair" >"$s2/data/pair-a"
    ln "$s2/data/pair-a" "$s2/data/pair-b"
    # No entry for `lib` itself, so the write goes through layer 1's symlink lib -> usr/lib.
    local d2; d2=$(layer "$s2" "$w/l2.gz" gzip --no-recursion \
        ./etc ./etc/.wh.remove-me ./dir ./dir/.wh.gone-dir ./dir/opaque \
        ./dir/opaque/upper-c ./dir/opaque/.wh..wh..opq ./lib/via-symlink.txt \
        ./data ./data/pair-a ./data/pair-b)

    # Layer 3 (zstd): a replaced file, a device node, a FIFO, setuid, non-root owner.
    local s3="$w/l3"; mkdir -p "$s3"/{etc,dev,bin,home/user}
    echo "motd from layer 3" >"$s3/etc/motd"
    mknod "$s3/dev/null" c 1 3
    mkfifo "$s3/dev/fifo"
    cp "$bb" "$s3/bin/suid-tool"; chmod 4755 "$s3/bin/suid-tool"
    echo "owned by user" >"$s3/home/user/note"
    chown 1000:1000 "$s3/home/user" "$s3/home/user/note"
    chmod 0600 "$s3/home/user/note"
    local d3; d3=$(layer "$s3" "$w/l3.zst" zstd .)

    local cfg='{"Env":["PATH=/bin:/usr/bin","SMOL_FIXTURE=busybox","LANG=C.UTF-8"],"Cmd":["/bin/sh","-c","cat /etc/motd"],"WorkingDir":"/data","User":"0:0"}'
    image "$out" latest amd64 "$cfg" "$w/l1.gz|$d1|$GZ" "$w/l2.gz|$d2|$GZ" "$w/l3.zst|$d3|$ZS" >/dev/null

    # For Docker v2 schema 2 (no zstd there): layers 1 and 2 again.
    local s1b="$w/l1b" s2b="$w/l2b"
    cp -a "$s1" "$s1b"; cp -a "$s2" "$s2b"
    d1=$(layer "$s1b" "$w/l1b.gz" gzip .)
    d2=$(layer "$s2b" "$w/l2b.gz" gzip --no-recursion ./etc ./etc/.wh.remove-me ./lib/via-symlink.txt)
    image "$out" docker-src amd64 "$cfg" "$w/l1b.gz|$d1|$GZ" "$w/l2b.gz|$d2|$GZ" >/dev/null

    # A multi-platform index: an arm64 impostor first, then amd64.
    local sa="$w/arm" sx="$w/amd"; mkdir -p "$sa/etc" "$sx/etc"
    echo arm64 >"$sa/etc/arch"; echo amd64 >"$sx/etc/arch"
    cp -a "$s1/bin" "$sx/bin"
    local da dx am as xm xs
    da=$(layer "$sa" "$w/arm.gz" gzip .); dx=$(layer "$sx" "$w/amd.gz" gzip .)
    read -r am as < <(image "$out" "" arm64 '{"Cmd":["/bin/sh"]}' "$w/arm.gz|$da|$GZ")
    read -r xm xs < <(image "$out" "" amd64 '{"Cmd":["/bin/sh"]}' "$w/amd.gz|$dx|$GZ")
    local idx="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"$am\",\"size\":$as,\"platform\":{\"architecture\":\"arm64\",\"os\":\"linux\",\"variant\":\"v8\"}},{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"$xm\",\"size\":$xs,\"platform\":{\"architecture\":\"amd64\",\"os\":\"linux\"}}]}"
    local im is; read -r im is < <(add_json "$out" "$idx")
    tag_layout "$out" multi "$im" "$is" application/vnd.oci.image.index.v1+json
    rm -rf "$w"
}

python_key() {
    # Everything the image depends on: suite, variant, packages, mirror, this function's text.
    { echo "bookworm minbase python3-minimal $MIRROR"; declare -f build_python python_key; } |
        sha256sum | cut -c1-16
}

build_python() {
    local key dir w
    key=$(python_key)
    dir="$CACHE_ROOT/python-$key"
    if [ -f "$dir/done" ]; then echo "$dir/layout"; return 0; fi
    need debootstrap debootstrap; need jq jq
    echo "test-registry: building the python test image (debootstrap, a few minutes, once)" >&2
    mkdir -p "$CACHE_ROOT"
    w=$(mktemp -d "$CACHE_ROOT/.build-XXXXXX")
    debootstrap --variant=minbase --include=python3-minimal bookworm "$w/rootfs" "$MIRROR" \
        >"$w/debootstrap.log" 2>&1 || { tail -20 "$w/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$w/rootfs/var/cache/apt/archives/"*.deb "$w/rootfs/var/lib/apt/lists/"* \
        "$w/rootfs/var/log/"*.log "$w/rootfs/proc/"* "$w/rootfs/sys/"*
    init_layout "$w/layout"
    local d1 d2 d3
    d1=$(layer "$w/rootfs" "$w/l1.gz" gzip --exclude=./usr/share --exclude='./usr/lib/python3*' .)
    d2=$(layer "$w/rootfs" "$w/l2.gz" gzip ./usr/share)
    d3=$(cd "$w/rootfs" && layer "$w/rootfs" "$w/l3.gz" gzip ./usr/lib/python3*)
    local cfg='{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8","PYTHONDONTWRITEBYTECODE=1"],"Cmd":["python3"],"WorkingDir":"/root"}'
    image "$w/layout" 3.12 amd64 "$cfg" "$w/l1.gz|$d1|$GZ" "$w/l2.gz|$d2|$GZ" "$w/l3.gz|$d3|$GZ" >/dev/null
    rm -rf "$w/rootfs" "$dir"
    mkdir -p "$dir"
    mv "$w/layout" "$dir/layout"
    touch "$dir/done"
    rm -rf "$w"
    echo "$dir/layout"
}

push() { # push SRC DEST [extra skopeo args]
    local src=$1 dst=$2; shift 2
    skopeo copy --quiet --dest-tls-verify=false "$@" "$src" "docker://$dst" >/dev/null
}

fixtures() {
    local port=$1 host="127.0.0.1:$1" w
    need skopeo skopeo
    w=$(mktemp -d)
    build_busybox "$w/busybox"
    push "oci:$w/busybox:latest" "$host/test/busybox:latest"
    push "oci:$w/busybox:docker-src" "$host/test/busybox:docker" --format v2s2
    push "oci:$w/busybox:multi" "$host/test/busybox:multi" --all
    rm -rf "$w"
    local py; py=$(build_python)
    push "oci:$py:3.12" "$host/library/python:3.12"
}

# launch PORT AUTH: a registry in a new directory ($dir, the caller's) on 127.0.0.1:PORT;
# fails when it exits before it answers (its log is $dir/registry.log).
launch() {
    local port=$1 auth=$2
    dir=$(mktemp -d "${TMPDIR:-/tmp}/smol-registry.XXXXXX")
    mkdir -p "$dir/data"
    cat >"$dir/config.yml" <<EOF
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $dir/data}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$port}
EOF
    if [ -n "$auth" ]; then
        local user=${auth%%:*} pass=${auth#*:} hash
        if command -v htpasswd >/dev/null 2>&1; then
            hash=$(htpasswd -nbB "$user" "$pass" | cut -d: -f2-)
        else
            hash=$(/usr/bin/python3 -c 'import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))' "$pass" 2>/dev/null)
        fi
        [ -n "$hash" ] || die "cannot make a bcrypt hash (apt-get install apache2-utils)"
        echo "$user:$hash" >"$dir/htpasswd"
        printf 'auth:\n  htpasswd: {realm: smol-test, path: %s}\n' "$dir/htpasswd" >>"$dir/config.yml"
    fi
    setsid docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        kill -0 "$(cat "$dir/pid")" 2>/dev/null || return 1
        sleep 0.05
    done
    # an answer from another listener on the port would hide the registry's failed bind
    sleep 0.1
    kill -0 "$(cat "$dir/pid")" 2>/dev/null
}

start() {
    local port="" watch="" fixtures=1 auth=""
    while [ $# -gt 0 ]; do
        case $1 in
            --port) port=$2; shift 2 ;;
            --auth) auth=$2; fixtures=0; shift 2 ;;
            --watch) watch=$2; shift 2 ;;
            --no-fixtures) fixtures=0; shift ;;
            *) die "unknown option $1" ;;
        esac
    done
    need docker-registry docker-registry
    # a port picked here may be taken before the registry binds it: then pick another
    local fixed=$port attempt dir
    for attempt in 1 2 3 4 5; do
        [ -n "$fixed" ] || port=$(free_port)
        if launch "$port" "$auth"; then break; fi
        if [ -n "$fixed" ] || [ "$attempt" = 5 ] || ! grep -q "address already in use" "$dir/registry.log"; then
            cat "$dir/registry.log" >&2
            rm -rf "$dir"
            die "registry exited"
        fi
        echo "test-registry: port $port was taken before the registry bound it; trying another" >&2
        rm -rf "$dir"
    done
    if [ -n "$watch" ]; then
        # Stop the registry once the owner goes (tests cannot clean up after themselves).
        setsid bash -c "while kill -0 $watch 2>/dev/null; do sleep 1; done; \
            kill \$(cat '$dir/pid') 2>/dev/null; sleep 0.5; rm -rf '$dir'" \
            >/dev/null 2>&1 </dev/null &
    fi
    if [ "$fixtures" = 1 ]; then
        fixtures "$port" || { stop "$dir"; die "pushing the fixtures failed"; }
    fi
    echo "PORT=$port"
    echo "DIR=$dir"
}

stop() {
    local dir=$1
    [ -f "$dir/pid" ] && kill "$(cat "$dir/pid")" 2>/dev/null || true
    case $dir in */smol-registry.*) rm -rf "$dir" ;; esac
}

case ${1:-} in
    start) shift; start "$@" ;;
    stop) stop "${2:?usage: stop DIR}" ;;
    fixtures) fixtures "${2:?usage: fixtures PORT}" ;;
    python-layout) build_python ;;
    busybox-layout) build_busybox "${2:?usage: busybox-layout OUT}" ;;
    *) sed -n '2,24p' "$0" >&2; exit 2 ;;
esac
