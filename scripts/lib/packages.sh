# shellcheck shell=bash
# Installing the Debian packages a command needs, sourced by scripts/up and scripts/test.
#
#   ensure_packages "<what for>" package:probe ...
#
# A probe is a command name looked up on PATH, /usr/sbin and /usr/local/sbin, or one of:
#   @postgres  PostgreSQL's server programs (/usr/lib/postgresql/<N>/bin/initdb, or initdb on PATH)
#   @venv      Python's venv module (python3 -m venv works)
# Missing packages are installed with apt-get (as root, or through sudo). When stdin is a
# terminal and CI is not "true", the user is asked first; otherwise they are installed
# without asking. Packages installed here whose services Debian starts on installation
# (redis-server, postgresql, haproxy) are stopped again: chatctl runs its own.

die() {
    echo "error: $*" >&2
    exit 1
}

probe_ok() {
    local probe=$1
    case $probe in
        @postgres)
            compgen -G '/usr/lib/postgresql/*/bin/initdb' > /dev/null || command -v initdb > /dev/null
            ;;
        @venv)
            command -v python3 > /dev/null && python3 -c 'import ensurepip, venv' 2> /dev/null
            ;;
        *)
            command -v "$probe" > /dev/null || [[ -x /usr/sbin/$probe || -x /usr/local/sbin/$probe ]]
            ;;
    esac
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo > /dev/null; then
        sudo "$@"
    else
        die "need root to run: $* (run this script as root, or install sudo)"
    fi
}

ensure_packages() {
    local purpose=$1
    shift
    local missing=() spec
    for spec in "$@"; do
        probe_ok "${spec#*:}" || missing+=("${spec%%:*}")
    done
    ((${#missing[@]})) || return 0
    echo "$purpose needs Debian packages that are missing: ${missing[*]}"
    command -v apt-get > /dev/null ||
        die "apt-get not found: install ${missing[*]} with your system's package manager"
    if [[ ${CI:-} != true && -t 0 ]]; then
        local answer
        read -r -p "Install them now with apt-get (sudo if needed)? [Y/n] " answer
        [[ -z $answer || $answer == [yY]* ]] ||
            die "not installed; install them with: sudo apt-get install -y ${missing[*]}"
    fi
    as_root apt-get update -qq || die "apt-get update failed"
    # Through env, not as a prefix: sudo resets the environment and would drop it, leaving
    # debconf free to ask questions on the terminal.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" ||
        die "apt-get could not install: ${missing[*]}"
    local package
    for package in "${missing[@]}"; do
        case $package in
            redis-server | postgresql | haproxy)
                as_root service "$package" stop > /dev/null 2>&1 || true
                ;;
        esac
    done
    for spec in "$@"; do
        probe_ok "${spec#*:}" || die "${spec%%:*} was installed but ${spec#*:} is still not found"
    done
}

# The packages of the local stack (scripts/up); the tests need these too.
# build-essential: a C linker for cargo.
# shellcheck disable=SC2034  # used by the scripts that source this file
STACK_PACKAGES=(build-essential:cc redis-server:redis-server postgresql:@postgres haproxy:haproxy)

require_cargo() {
    command -v cargo > /dev/null && return 0
    # sudo resets PATH, so a user's ~/.cargo/bin is gone: the fix is not to install Rust again.
    if [[ $(id -u) -eq 0 && -n ${SUDO_USER:-} && $SUDO_USER != root ]]; then
        die "cargo not found on root's PATH: run this script as $SUDO_USER, without sudo (it uses sudo itself to install packages)"
    fi
    die "cargo not found: install Rust first (https://rustup.rs)"
}
