#!/bin/sh
# Install clawnode, the MOLT provider agent, and join this machine to the mesh.
#
#   curl -fsSL @GATEWAY@/install.sh | sudo sh -s -- --token TOKEN [OPTIONS] [-- JOIN FLAGS]
#
# Served by the gateway with its own address written in. POSIX sh, for Debian and Ubuntu.
# Every step is printed as [N/6]; a failure names its step and why, and exits non-zero.
# The options are in usage() below (or: sh install.sh --help).

# Everything is inside main, called on the last line: piped into sh, nothing runs until the
# whole script has arrived, so a cut-off download cannot run half of it.
main() {
    set -eu

    GATEWAY=@GATEWAY@
    AGENT_VERSION=@AGENT_VERSION@
    AGENT_WHEEL=@AGENT_WHEEL@
    AGENT_SHA256=@AGENT_SHA256@

    TOTAL=6
    STEP=0
    STEP_NAME="reading the options"
    WORK=""
    trap on_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    TOKEN=${CLAWNODE_TOKEN:-}
    PREFIX=/opt/clawnode
    STATE_DIR=""
    PREFIX_GIVEN=0
    SKIP_APT=0
    SYSTEMD=1
    FIND_LINKS=""
    INSECURE=0
    while [ $# -gt 0 ]; do
        case $1 in
            --token) need_value "$@"; TOKEN=$2; shift 2 ;;
            --token=*) TOKEN=${1#*=}; shift ;;
            --prefix) need_value "$@"; PREFIX=$2; PREFIX_GIVEN=1; shift 2 ;;
            --prefix=*) PREFIX=${1#*=}; PREFIX_GIVEN=1; shift ;;
            --state-dir) need_value "$@"; STATE_DIR=$2; shift 2 ;;
            --state-dir=*) STATE_DIR=${1#*=}; shift ;;
            --find-links) need_value "$@"; FIND_LINKS=$2; shift 2 ;;
            --find-links=*) FIND_LINKS=${1#*=}; shift ;;
            --gateway) need_value "$@"; GATEWAY=$2; shift 2 ;;
            --gateway=*) GATEWAY=${1#*=}; shift ;;
            --skip-apt) SKIP_APT=1; shift ;;
            --no-systemd) SYSTEMD=0; shift ;;
            --insecure) INSECURE=1; shift ;;
            -h|--help) usage; exit 0 ;;
            --) shift; break ;;
            *) die "unknown option $1 (flags for clawnode join go after --; see --help)" ;;
        esac
    done
    # What is left in "$@" goes to clawnode join.
    GATEWAY=${GATEWAY%/}
    if [ -z "$STATE_DIR" ]; then
        if [ "$PREFIX_GIVEN" = 1 ]; then STATE_DIR=$PREFIX/state; else STATE_DIR=/var/lib/clawnode; fi
    fi
    [ -n "$TOKEN" ] || die "no enrolment token: pass --token TOKEN (create one on $GATEWAY/provider/nodes/)"
    check_path --prefix "$PREFIX"
    check_path --state-dir "$STATE_DIR"
    case $GATEWAY in
        https://*) ;;
        # Loopback never leaves this machine (a gateway run locally).
        http://127.*|http://localhost|http://localhost:*|http://\[::1\]*) ;;
        http://*)
            # Whoever answers a plain-text join has their key pinned as the gateway's and then
            # controls this node's peers; the agent refuses it too without --insecure.
            [ "$INSECURE" = 1 ] || die "$GATEWAY is plain http: anyone on the path could pose as the gateway; use https://, or pass --insecure on a network you trust"
            set -- --insecure "$@" ;;
        *) die "--gateway must be an http:// or https:// URL, not $GATEWAY" ;;
    esac
    # The agent must report the same simulated GPUs when it runs as when it joined.
    SIMULATED=""
    previous=""
    for arg in "$@"; do
        [ "$previous" = "--simulated-gpus" ] && SIMULATED=$arg
        case $arg in --simulated-gpus=*) SIMULATED=${arg#*=} ;; esac
        previous=$arg
    done

    # -- 1 ------------------------------------------------------------------------------------
    step 1 "checking this machine"
    [ "$(id -u)" = 0 ] || die "run this as root: curl -fsSL $GATEWAY/install.sh | sudo sh -s -- --token ..."
    os="unknown"
    os_family=""
    if [ -r /etc/os-release ]; then
        # shellcheck source=/dev/null
        os=$(. /etc/os-release && printf '%s' "${PRETTY_NAME:-${ID:-unknown}}")
        # shellcheck source=/dev/null
        os_family=$(. /etc/os-release && printf ' %s %s ' "${ID:-}" "${ID_LIKE:-}")
    fi
    case $os_family in
        *" debian "*|*" ubuntu "*) say "  $os, $(uname -m)" ;;
        *)
            if [ "$SKIP_APT" = 1 ]; then
                say "  $os: not Debian or Ubuntu; going on since --skip-apt was given"
            else
                die "this installer supports Debian and Ubuntu; this is $os. Install wireguard-tools, nftables and Python 3.11+ yourself, then re-run with --skip-apt"
            fi
            ;;
    esac
    # Podman gives each sandbox a user namespace from the "containers" subordinate ids
    # (--userns=auto); without them the first sandbox fails with "No subuid ranges found". The
    # agent's engine is chosen later (clawnode run --sandbox-engine), and the entry only
    # reserves ids nobody else has, so it is set up whatever the engine will be.
    add_container_subids /etc/subuid /etc/subgid

    # -- 2 ------------------------------------------------------------------------------------
    if [ "$SKIP_APT" = 1 ]; then
        step 2 "system packages: skipped (--skip-apt), checking they are there"
        missing=""
        for tool in wg:wireguard-tools nft:nftables ip:iproute2 python3:python3-venv curl:curl; do
            command -v "${tool%%:*}" >/dev/null 2>&1 || missing="$missing ${tool#*:}"
        done
        [ -z "$missing" ] || die "missing:$missing (apt-get install$missing, or run without --skip-apt)"
        if kernel_has_wireguard; then
            say "  the kernel has WireGuard"
        else
            command -v wireguard-go >/dev/null 2>&1 \
                || die "this kernel has no WireGuard module and wireguard-go is missing (apt-get install wireguard-go, or run without --skip-apt)"
            say "  the kernel has no WireGuard module: the agent will use wireguard-go"
        fi
    else
        step 2 "installing wireguard-tools, nftables and python3-venv with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq </dev/null || die "apt-get update failed (see above)"
        apt-get install -y -qq --no-install-recommends \
            wireguard-tools nftables iproute2 python3 python3-venv curl ca-certificates </dev/null \
            || die "apt-get install failed (see above)"
        if kernel_has_wireguard; then
            say "  the kernel has WireGuard"
        else
            say "  the kernel has no WireGuard module: installing wireguard-go (userspace)"
            apt-get install -y -qq --no-install-recommends wireguard-go </dev/null \
                || die "apt-get install wireguard-go failed (see above)"
        fi
    fi

    # -- 3 ------------------------------------------------------------------------------------
    step 3 "creating virtualenv in $PREFIX"
    command -v python3 >/dev/null 2>&1 || die "python3 not found (apt-get install python3 python3-venv)"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "clawnode needs Python 3.11 or newer; python3 here is $(python3 -V 2>&1)"
    python3 -m venv "$PREFIX" </dev/null \
        || die "python3 -m venv $PREFIX failed (on Debian and Ubuntu: apt-get install python3-venv)"
    say "  $("$PREFIX/bin/python" -V 2>&1) in $PREFIX"

    # -- 4 ------------------------------------------------------------------------------------
    step 4 "installing clawnode $AGENT_VERSION from $GATEWAY"
    WORK=$(mktemp -d)
    wheel=$WORK/$AGENT_WHEEL
    curl -fsSL -o "$wheel" "$GATEWAY/agent/$AGENT_WHEEL" \
        || die "could not download $GATEWAY/agent/$AGENT_WHEEL"
    if command -v sha256sum >/dev/null 2>&1; then
        got=$(sha256sum "$wheel" | cut -d ' ' -f 1)
        [ "$got" = "$AGENT_SHA256" ] \
            || die "$AGENT_WHEEL has SHA-256 $got, not $AGENT_SHA256 as the gateway said (a proxy or a cut-off download?)"
    fi
    if [ -n "$FIND_LINKS" ]; then
        say "  dependencies from $FIND_LINKS"
    else
        say "  dependencies from PyPI (this can take a minute)"
    fi
    pip_log=$WORK/pip.log
    # The wheel with its dependencies, then this exact build over it: a re-run with the same
    # version number but newer code must not keep the old files.
    if pip_install "$wheel" >"$pip_log" 2>&1 \
        && pip_install --no-deps --force-reinstall "$wheel" >>"$pip_log" 2>&1; then
        grep '^Successfully installed' "$pip_log" | sed 's/^/  /' || true
    else
        sed 's/^/  /' "$pip_log" >&2
        die "pip could not install $AGENT_WHEEL and its dependencies (see above)"
    fi
    say "  $("$PREFIX/bin/clawnode" --version) in $PREFIX/bin/clawnode"

    # -- 5 ------------------------------------------------------------------------------------
    step 5 "joining the mesh at $GATEWAY"
    join_log=$WORK/join.log
    # The token goes through the environment, not the command line, to stay out of ps.
    if CLAWNODE_TOKEN=$TOKEN "$PREFIX/bin/clawnode" join --gateway "$GATEWAY" \
        --state-dir "$STATE_DIR" "$@" </dev/null >"$join_log" 2>&1; then
        sed 's/^/  /' "$join_log"
    else
        sed 's/^/  /' "$join_log" >&2
        reason=$(tail -n 1 "$join_log")
        die "clawnode join: ${reason#clawnode: error: }"
    fi
    joined=$(grep 'joined the mesh at' "$join_log" | tail -n 1)

    # -- 6 ------------------------------------------------------------------------------------
    if [ -n "$SIMULATED" ]; then
        run_args="run --state-dir $STATE_DIR --simulated-gpus \"$SIMULATED\""
    else
        run_args="run --state-dir $STATE_DIR"
    fi
    if [ "$SYSTEMD" = 0 ]; then
        step 6 "systemd unit: skipped (--no-systemd)"
        say "  start the agent as root, under the supervisor of your choice:"
        say "    $PREFIX/bin/clawnode $run_args"
    else
        step 6 "installing and starting clawnode.service"
        [ -d /run/systemd/system ] \
            || die "systemd is not running here: re-run with --no-systemd and start the agent yourself"
        unit=/etc/systemd/system/clawnode.service
        cat >"$unit" <<UNIT
[Unit]
Description=MOLT provider agent (clawnode)
Documentation=$GATEWAY/provider/nodes/
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=$PREFIX/bin/clawnode $run_args
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
UNIT
        systemctl daemon-reload
        systemctl enable clawnode.service >/dev/null 2>&1 || die "systemctl enable clawnode.service failed"
        systemctl restart clawnode.service || die "clawnode.service did not start: journalctl -u clawnode.service"
        say "  $unit: $(systemctl is-active clawnode.service 2>&1)"
    fi
    STEP="done"
    say "done: $joined"
}

usage() {
    cat <<'USAGE'
Install clawnode, the MOLT provider agent, and join this machine to the mesh.

Usage: curl -fsSL GATEWAY/install.sh | sudo sh -s -- --token TOKEN [OPTIONS] [-- JOIN FLAGS]

Options:
  --token TOKEN      the one-time enrolment token from the provider's nodes page (or set
                     CLAWNODE_TOKEN)
  --prefix DIR       install under DIR: the virtualenv in DIR, the node's state in DIR/state
                     (default: virtualenv /opt/clawnode, state /var/lib/clawnode)
  --state-dir DIR    where the node's identity and enrolment are kept
  --skip-apt         install no system packages (wireguard-tools, nftables, python3-venv must
                     be there already; for tests and air-gapped machines)
  --find-links DIR   install clawnode's Python dependencies from DIR instead of PyPI
  --no-systemd       install no systemd unit; print how to start the agent instead
  --gateway URL      the gateway to join (default: the one this script came from)
  --insecure         allow a plain http:// gateway off this machine (a lab network you
                     trust); without it only https:// or this machine's own address
  -h, --help         this text
  --                 everything after it goes to `clawnode join`, e.g.
                     -- --endpoint 203.0.113.7:51820 --interface molt0
                     -- --simulated-gpus "RTX 4090:2"   (a demo machine without NVIDIA GPUs)

It also gives podman's "containers" user subordinate ids for job sandboxes' user namespaces
(containers:2147483647:2147483648 in /etc/subuid and /etc/subgid), where there is no containers
entry yet; a range that overlaps another entry there is refused, and nothing is written.

Running it again is safe: an enrolled machine stays enrolled (clawnode join says so), the
containers entries are kept, the package is reinstalled and the service restarted.
USAGE
}

say() { printf '%s\n' "$*"; }

step() {
    STEP=$1
    shift
    STEP_NAME=$*
    say "[$STEP/$TOTAL] $STEP_NAME"
}

die() {
    say "error: $*" >&2
    exit 1
}

need_value() {
    [ $# -ge 2 ] || die "$1 needs a value"
}

check_path() {
    case $2 in
        /*) ;;
        *) die "$1 must be an absolute path, not $2" ;;
    esac
    # Paths go into a systemd unit line unquoted.
    case $2 in
        *[[:space:]]*) die "$1 must not contain spaces: $2" ;;
    esac
}

kernel_has_wireguard() {
    probe=cnprobe$$
    if ip link add "$probe" type wireguard >/dev/null 2>&1; then
        ip link del "$probe" >/dev/null 2>&1 || true
        return 0
    fi
    return 1
}

# add_container_subids SUBUID_FILE SUBGID_FILE: give the "containers" user subordinate ids in
# both files, only in a file that has no "containers" entry yet (the provider's own choice, or
# this script's on an earlier run, is kept). Before writing anything the range is checked
# against every other entry of both files: an overlap would let a sandbox's root share ids with
# whoever owns that range, so it is refused, and nothing is written.
add_container_subids() {
    # The range .ci/run sets, the usual one for --userns=auto: the upper half of the 32-bit id
    # space, clear of the ids useradd hands out (100000 up), ending just below 4294967295, which
    # means "no id".
    subids_start=2147483647
    subids_count=2147483648
    range="containers:$subids_start:$subids_count"
    subids_missing=0
    for ids in "$@"; do
        has_containers_entry "$ids" || subids_missing=1
    done
    if [ "$subids_missing" = 0 ]; then
        say "  $1 and $2 have a containers entry (sandbox user namespaces)"
        return 0
    fi
    for ids in "$@"; do
        [ -e "$ids" ] || continue
        [ -r "$ids" ] || die "cannot read $ids"
        overlap=$(awk -F: -v start="$subids_start" -v count="$subids_count" '
            $1 != "containers" && $2 ~ /^[0-9]+$/ && $3 ~ /^[0-9]+$/ \
                && $2 + 0 < start + count && start + 0 < $2 + $3 { print; exit }' "$ids") \
            || die "cannot read $ids"
        [ -z "$overlap" ] \
            || die "$ids has $overlap, which overlaps $range, the ids this script gives sandbox user namespaces; nothing was written. Add a containers entry with a free range to both /etc/subuid and /etc/subgid yourself (containers:START:COUNT, COUNT a multiple of 65536) and run this again"
    done
    for ids in "$@"; do
        ! has_containers_entry "$ids" || continue
        # Appended as a line of its own, even to a file whose last line has no newline.
        if [ -s "$ids" ] && [ -n "$(tail -c 1 "$ids")" ]; then
            printf '\n' >>"$ids" || die "cannot write $ids"
        fi
        [ -e "$ids" ] || { : >"$ids" && chmod 644 "$ids"; } || die "cannot create $ids"
        printf '%s\n' "$range" >>"$ids" || die "cannot write $ids"
        say "  $ids: added $range (sandbox user namespaces)"
    done
}

has_containers_entry() {
    grep -q '^containers:' "$1" 2>/dev/null
}

pip_install() {
    if [ -n "$FIND_LINKS" ]; then
        "$PREFIX/bin/pip" install --disable-pip-version-check --no-input --progress-bar off \
            --no-index --find-links "$FIND_LINKS" "$@" </dev/null
    else
        "$PREFIX/bin/pip" install --disable-pip-version-check --no-input --progress-bar off \
            "$@" </dev/null
    fi
}

on_exit() {
    status=$?
    if [ -n "${WORK:-}" ]; then rm -rf "$WORK"; fi
    if [ "$status" != 0 ]; then
        if [ "$STEP" = 0 ]; then
            say "clawnode install failed while $STEP_NAME (exit $status)" >&2
        elif [ "$STEP" != "done" ]; then
            say "clawnode install failed at step [$STEP/$TOTAL] $STEP_NAME (exit $status)" >&2
        fi
    fi
}

main "$@"
