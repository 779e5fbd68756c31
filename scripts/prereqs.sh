# shellcheck shell=bash
# Prerequisite checks shared by scripts/test and scripts/matrix (sourced from the repository root,
# not run). Tools are found with `command -v`; a missing one is installed with apt-get only where
# apt exists (as root, or through sudo). Anywhere else the script stops and names the packages to
# install, instead of failing halfway with "command not found".
# Every function returns non-zero on failure, also where the caller's `set -e` does not reach
# (`need_tools ... || exit 2`).

prereq_script=${0##*/}

# have TOOL: TOOL is on PATH, or in an sbin directory that a non-root user's PATH often leaves out
# (Debian puts nft there; sudo finds it).
have() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

# as_root CMD...: runs CMD as root: directly when we are root, else through sudo.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "$prereq_script: '$*' needs root and sudo is not installed; run this script as root" >&2
    return 1
  fi
}

# need_tools TOOL=PACKAGE...: makes sure every TOOL exists. PACKAGE is its Debian/Ubuntu package
# (one package may provide several tools). With apt-get, missing packages are installed; without
# it, the packages are named and need_tools fails.
need_tools() {
  local missing=() tools=() pair tool pkg
  for pair in "$@"; do
    tool=${pair%%=*}
    pkg=${pair#*=}
    have "$tool" && continue
    tools+=("$tool")
    case " ${missing[*]} " in
      *" $pkg "*) ;;
      *) missing+=("$pkg") ;;
    esac
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${missing[*]}" >&2
    as_root apt-get update >&2 || return 1
    # miniupnpd's package must not start a daemon in the root namespace: the lab runs its own
    # inside a router (netns-lab/src/miniupnpd.rs). "no" is the default; say it anyway.
    case " ${missing[*]} " in *" miniupnpd-nftables "*)
      echo 'miniupnpd miniupnpd/start_daemon boolean false' | as_root debconf-set-selections || return 1 ;;
    esac
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 || return 1
    case " ${missing[*]} " in *" miniupnpd-nftables "*)
      if pgrep -x miniupnpd >/dev/null; then
        echo "$prereq_script: installing miniupnpd-nftables started a miniupnpd; stop it (systemctl disable --now miniupnpd)" >&2
        return 1
      fi ;;
    esac
    return 0
  fi
  echo "$prereq_script: missing tools: ${tools[*]}" >&2
  echo "$prereq_script: no apt-get here; install them with your package manager (Debian/Ubuntu names: ${missing[*]}) and run again" >&2
  return 1
}

# need_rust [COMPONENT...]: cargo and a rustc at least as new as the workspace's rust-version
# (Cargo.toml), plus the named rustup components (e.g. rustfmt clippy). Distribution packages of
# Rust are often older than that (Debian 12 ships rustc 1.63): rustup gives the current stable.
need_rust() {
  local want found component
  want=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
  if ! command -v cargo >/dev/null 2>&1; then
    echo "$prereq_script: cargo not found; natscope needs Rust >= $want, installed with rustup (https://rustup.rs)" >&2
    return 1
  fi
  found=$("${RUSTC:-rustc}" --version 2>/dev/null | cut -d' ' -f2)
  if [ -z "$found" ] || [ "$(printf '%s\n%s\n' "$want" "$found" | sort -V | head -n1)" != "$want" ]; then
    echo "$prereq_script: natscope needs Rust >= $want, found ${found:-no rustc}; install the current stable with rustup (https://rustup.rs), then 'rustup default stable'" >&2
    return 1
  fi
  for component in "$@"; do
    if ! cargo "$component" --version >/dev/null 2>&1; then
      echo "$prereq_script: 'cargo $component' is missing; install it with 'rustup component add $component'" >&2
      return 1
    fi
  done
}
