# guest-images/lib.sh: helpers shared by guest-images/build and
# scripts/testbed-image (bash, sourced).

# copy_with_libs DEST FILE...: copy each executable/library FILE to
# DEST/FILE (symlinks resolved) together with its ldd closure, so that it runs
# with DEST as the root directory.
copy_with_libs() {
    local dest=$1 f lib
    shift
    for f in "$@"; do
        [ -e "$f" ] || { echo "copy_with_libs: $f not found" >&2; return 1; }
        mkdir -p "$dest$(dirname "$f")"
        cp -L "$f" "$dest$f"
        # static binaries: ldd exits non-zero with "not a dynamic executable"
        ldd "$f" 2>/dev/null | awk '
            $2 == "=>" && $3 ~ /^\// { print $3 }
            $1 ~ /^\// { print $1 }' | while read -r lib; do
            if [ ! -e "$dest$lib" ]; then
                mkdir -p "$dest$(dirname "$lib")"
                cp -L "$lib" "$dest$lib"
            fi
        done
    done
}

# install_busybox DEST: static busybox at DEST/bin/busybox plus a symlink per
# applet in DEST/bin (except ones given in BUSYBOX_SKIP, space separated).
install_busybox() {
    local dest=$1 a
    mkdir -p "$dest/bin" "$dest/sbin" "$dest/usr/bin" "$dest/usr/sbin"
    cp -L /bin/busybox "$dest/bin/busybox"
    for a in $("$dest/bin/busybox" --list); do
        case " ${BUSYBOX_SKIP:-} busybox " in *" $a "*) continue;; esac
        [ -e "$dest/bin/$a" ] || ln -s busybox "$dest/bin/$a"
    done
}

# make_cpio SRC_DIR OUT [gzip|none]: newc cpio of SRC_DIR, owned by root.
make_cpio() {
    local src=$1 out=$2 comp=${3:-none}
    (cd "$src" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$out.tmp"
    if [ "$comp" = gzip ]; then gzip -6 -n -c "$out.tmp" > "$out.tmp.gz" && mv "$out.tmp.gz" "$out"; rm -f "$out.tmp"; else mv "$out.tmp" "$out"; fi
}

# hash_inputs FILE...: one sha256 over the named files' contents and stdin.
hash_inputs() {
    { cat "$@"; cat; } | sha256sum | cut -d' ' -f1
}

pkg_versions() { # pkg_versions PKG...: "name version" lines (missing ones say so)
    local p
    for p in "$@"; do
        dpkg-query -W -f '${Package} ${Version}\n' "$p" 2>/dev/null || echo "$p missing"
    done
}
