#!/usr/bin/env bash
# Installs the pinned toolchains of the plugin kits (`embedhost plugin new
# --lang python|js`) into $EMBEDHOST_DEPS/kits (default
# target/embedhost-deps/kits):
#
#   kits/python/   a venv with componentize-py, pinned by kits/python/requirements.txt
#   kits/js/       node_modules with componentize-js, pinned by kits/js/package.json
#                  and package-lock.json
#
# Idempotent: a toolchain is installed again only when its pin files differ
# from the copies kept beside it. The Rust kit needs no install beyond the
# wasm32-wasip2 target (`./x setup`).
#
#   scripts/kits.sh python|js|all
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
deps="${EMBEDHOST_DEPS:-$root/target/embedhost-deps}"

# Whether every pin file of a kit has its copy, unchanged, in $2.
pinned() {
    local kit="$1" dir="$2" file
    shift 2
    for file in "$@"; do
        cmp -s "$root/kits/$kit/$file" "$dir/.pins/$file" || return 1
    done
}

keep_pins() {
    local kit="$1" dir="$2" file
    shift 2
    mkdir -p "$dir/.pins"
    for file in "$@"; do
        cp "$root/kits/$kit/$file" "$dir/.pins/$file"
    done
}

python_kit() {
    local dir="$deps/kits/python"
    if [ -x "$dir/bin/componentize-py" ] && pinned python "$dir" requirements.txt; then
        return
    fi
    echo "kits: installing the Python kit's toolchain (kits/python/requirements.txt) into $dir" >&2
    local started=$SECONDS
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/python" -m pip install -q --disable-pip-version-check -r "$root/kits/python/requirements.txt" >&2
    keep_pins python "$dir" requirements.txt
    echo "kits: Python kit ready in $((SECONDS - started)) s ($("$dir/bin/componentize-py" --version))" >&2
}

js_kit() {
    local dir="$deps/kits/js"
    if [ -d "$dir/node_modules/@bytecodealliance/componentize-js" ] \
        && pinned js "$dir" package.json package-lock.json; then
        return
    fi
    if ! command -v npm >/dev/null 2>&1; then
        echo "kits: the JavaScript kit needs Node.js 20 or later with npm; install it first" >&2
        exit 1
    fi
    echo "kits: installing the JavaScript kit's toolchain (kits/js/package-lock.json) into $dir" >&2
    local started=$SECONDS
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$root/kits/js/package.json" "$root/kits/js/package-lock.json" "$dir/"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
    keep_pins js "$dir" package.json package-lock.json
    echo "kits: JavaScript kit ready in $((SECONDS - started)) s" >&2
}

case "${1:-all}" in
    python) python_kit ;;
    js) js_kit ;;
    all)
        python_kit
        js_kit
        ;;
    *)
        echo "usage: scripts/kits.sh python|js|all" >&2
        exit 2
        ;;
esac
