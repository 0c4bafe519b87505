#!/usr/bin/env bash
# Puts the Mosquitto broker and clients (Debian packages) into build/mosquitto/ without
# installing anything system-wide: `apt-get download` the .debs, `dpkg -x` them, and write
# wrappers in build/mosquitto/bin/ that set LD_LIBRARY_PATH to the extracted libraries.
# Used by the MQTT benchmark (the broker to compare with) and by the device-protocol test
# (mosquitto_pub / mosquitto_sub as a device). A no-op once the wrappers run.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${MOSQUITTO_DIR:-$ROOT/build/mosquitto}"
BINARIES=(sbin/mosquitto bin/mosquitto_pub bin/mosquitto_sub)

# A binary that cannot start (missing file or library) exits 127; `mosquitto -h` and
# `mosquitto_pub --help` print their usage and exit 3 and 1.
runs() {
  local code=0
  "$@" >/dev/null 2>&1 || code=$?
  [ "$code" -ne 127 ]
}
installed() {
  for binary in "${BINARIES[@]}"; do
    [ -x "$DEST/bin/$(basename "$binary")" ] || return 1
  done
  runs "$DEST/bin/mosquitto" -h && runs "$DEST/bin/mosquitto_pub" --help && runs "$DEST/bin/mosquitto_sub" --help
}
if installed; then
  exit 0
fi
command -v apt-get >/dev/null && command -v dpkg >/dev/null \
  || { echo "install-mosquitto: needs a Debian-based system (apt-get, dpkg)" >&2; exit 1; }

# A fresh container has no package lists: `apt-get download` would not know the packages.
if ! apt-cache show mosquitto >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || { echo "install-mosquitto: run 'apt-get update' as root first" >&2; exit 1; }
  apt-get update -qq
fi

is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

# The packages plus the libraries they need that the system lacks (recursively). Maintainer-script
# dependencies (adduser, lsb-base) do not matter to files extracted with dpkg -x.
packages=()
queue=(mosquitto mosquitto-clients)
while [ "${#queue[@]}" -gt 0 ]; do
  package="${queue[0]}"
  queue=("${queue[@]:1}")
  case " ${packages[*]-} " in *" $package "*) continue ;; esac
  packages+=("$package")
  while read -r dependency; do
    if ! is_installed "$dependency"; then
      queue+=("$dependency")
    fi
  done < <(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
    --no-enhances "$package" | sed -n 's/^ *|\?\(Pre\)\?Depends: \(lib[^ <>]*\)$/\2/p')
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "install-mosquitto: downloading ${packages[*]}"
# -o APT::Sandbox::User=root: the _apt user may not write into the temporary directory.
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "${packages[@]}")
mkdir -p "$work/root"
for deb in "$work"/*.deb; do
  dpkg -x "$deb" "$work/root"
done

libraries="$(find "$work/root" -name '*.so*' -printf '%h\n' | sort -u | tr '\n' ':')"
missing="$(for binary in "${BINARIES[@]}"; do
  LD_LIBRARY_PATH="$libraries" ldd "$work/root/usr/$binary" | grep 'not found' || true
done)"
if [ -n "$missing" ]; then
  echo "install-mosquitto: libraries still missing:" >&2
  echo "$missing" | sort -u >&2
  exit 1
fi

rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp/bin"
mv "$work/root" "$DEST.tmp/root"
for binary in "${BINARIES[@]}"; do
  name="$(basename "$binary")"
  # Relative to the wrapper, so the tree can move with the checkout.
  lib_path="$(cd "$DEST.tmp/root" && find . -name '*.so*' -printf '%h\n' | sort -u \
    | sed 's|^\./|$here/../root/|' | paste -sd: -)"
  cat >"$DEST.tmp/bin/$name" <<EOF
#!/bin/sh
here="\$(cd "\$(dirname "\$0")" && pwd)"
LD_LIBRARY_PATH="$lib_path\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$here/../root/usr/$binary" "\$@"
EOF
  chmod +x "$DEST.tmp/bin/$name"
done
printf '%s\n' "${packages[@]}" >"$DEST.tmp/packages.txt"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
installed || { echo "install-mosquitto: the installed binaries do not run" >&2; exit 1; }
"$DEST/bin/mosquitto" -h 2>&1 | sed -n 1p || true
