#!/usr/bin/env bash
# Builds FerretDB (MongoDB wire protocol over SQLite: the embedded database) once per
# machine, from its Go module, into a cache shared by every clone of this repo.
# `go install github.com/FerretDB/FerretDB/cmd/ferretdb@v1.24.2` is not used directly:
# the module proxy refuses the module's version list (403), and a binary built that
# way panics at start because the module zip lacks build/version/version.txt.
# The patches in tools/ferretdb/ are applied first (see tools/ferretdb/README.md); a new patch
# means a new BUILD, here and in medmesh/launcher/config.py (FERRETDB_BUILD), so every machine
# builds it again.
set -euo pipefail
VERSION="${FERRETDB_VERSION:-v1.24.2}"
BUILD="$VERSION-medmesh.1"
PATCHES="$(cd "$(dirname "$0")/ferretdb" && pwd)"
DEST="${MEDMESH_CACHE_DIR:-$HOME/.cache/medmesh}/ferretdb-$BUILD"
if [ -x "$DEST/ferretdb" ] && "$DEST/ferretdb" --version >/dev/null 2>&1; then
  exit 0
fi
command -v go >/dev/null || { echo "install-ferretdb: Go is required (https://go.dev/dl/)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
echo "building FerretDB $BUILD (first time only, about 2 minutes)..."
src="$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "github.com/FerretDB/FerretDB@$VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
[ -d "$src" ] || { echo "install-ferretdb: could not download the FerretDB module" >&2; exit 1; }
cp -r "$src" "$work/src"
chmod -R u+w "$work/src"
for patch in "$PATCHES"/*.patch; do
  (cd "$work/src" && git apply --verbose "$patch") || { echo "install-ferretdb: $patch does not apply" >&2; exit 1; }
done
echo "$VERSION" > "$work/src/build/version/version.txt"
mkdir -p "$DEST"
(cd "$work/src" && CGO_ENABLED=0 go build -trimpath -o "$DEST/ferretdb.tmp" ./cmd/ferretdb)
mv "$DEST/ferretdb.tmp" "$DEST/ferretdb"
"$DEST/ferretdb" --version | sed -n 1p
