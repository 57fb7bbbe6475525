# Sourced by the scripts: makes `cargo` callable when they run as root through sudo, which
# resets PATH and HOME. Uses the invoking user's rustup toolchain when root has none.
if ! command -v cargo >/dev/null 2>&1; then
  for home in "$HOME" "$(getent passwd "${SUDO_USER:-root}" | cut -d: -f6)"; do
    if [ -n "$home" ] && [ -x "$home/.cargo/bin/cargo" ]; then
      export PATH="$home/.cargo/bin:$PATH"
      export CARGO_HOME="${CARGO_HOME:-$home/.cargo}"
      [ -d "$home/.rustup" ] && export RUSTUP_HOME="${RUSTUP_HOME:-$home/.rustup}"
      break
    fi
  done
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "no Rust toolchain found (cargo); install one from https://rustup.rs and run again" >&2
  exit 1
fi
