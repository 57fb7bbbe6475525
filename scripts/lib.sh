# Sourced by the scripts: privileges and the build user.
#
# The scripts need root (network namespaces, netlink, packages). Run as root they just go on;
# run as a normal user they re-run themselves through sudo; with no sudo they say what to do.
# Through sudo, cargo runs as the user who called (so target/ and ~/.cargo stay theirs) and only
# what needs root runs as root.

# Environment the scripts read, carried through sudo (which resets the environment).
TWILL_PASSED_ENV=(TWILL_TEST_THREADS RUST_LOG RUST_BACKTRACE CARGO_TERM_COLOR CARGO_TARGET_DIR
  TWILL_LAB_STATE TWILL_LAB_PREFIX TWILL_SUDO)

# twill_need_root "$@": returns when root; otherwise re-executes the calling script as root.
twill_need_root() {
  [ "$(id -u)" -eq 0 ] && return 0
  local sudo="${TWILL_SUDO:-sudo}" script what
  script=$(basename "$0")
  what="./scripts/$script needs root: it creates network namespaces and installs packages"
  if ! command -v "$sudo" >/dev/null 2>&1; then
    echo "$what, and sudo is not installed. Run it as root: su -c './scripts/$script $*'" >&2
    exit 1
  fi
  local env=() v
  for v in "${TWILL_PASSED_ENV[@]}"; do
    [ -n "${!v+x}" ] && env+=("$v=${!v}")
  done
  echo "$script: $what; running it through sudo" >&2
  exec "$sudo" -- env "${env[@]}" "$(readlink -f "$0")" "$@"
}

# The user who ran sudo, when there is one (not root) and they have a Rust toolchain: cargo runs
# as them. Empty otherwise (cargo runs as root, finding root's or that user's toolchain).
twill_build_user() {
  [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] || return 0
  local home
  home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
  [ -n "$home" ] && [ -x "$home/.cargo/bin/cargo" ] && echo "$SUDO_USER"
}

# twill_as_builder CMD...: runs CMD as the build user (see above), else as is.
twill_as_builder() {
  local user
  user=$(twill_build_user)
  if [ -z "$user" ]; then
    "$@"
    return
  fi
  local home env=() v
  home=$(getent passwd "$user" | cut -d: -f6)
  for v in "${TWILL_PASSED_ENV[@]}"; do
    [ -n "${!v+x}" ] && env+=("$v=${!v}")
  done
  # -H: the user's HOME, so cargo uses their ~/.cargo and ~/.rustup.
  "${TWILL_SUDO:-sudo}" -u "$user" -H -- env PATH="$home/.cargo/bin:$PATH" "${env[@]}" "$@"
}

# twill_give_back DIR...: files root created under DIR (cargo test as root, the tests' own
# builds) go back to the build user, so their next cargo build can write there.
twill_give_back() {
  local user
  user=$(twill_build_user)
  [ -n "$user" ] || return 0
  local d
  for d in "$@"; do
    [ -e "$d" ] && chown -R --from=0:0 "$user:$(id -gn "$user")" "$d"
  done
  return 0
}
