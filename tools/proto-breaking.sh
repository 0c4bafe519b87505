#!/usr/bin/env bash
# `buf breaking` of the working tree's protos against a git revision (default: main).
# When HEAD is that revision, the check is against its parent, so a commit on main is
# still compared with what was there before it. Skipped where the revision has no protos.
set -euo pipefail
against="${1:-main}"
cd "$(dirname "$0")/.."
if ! git rev-parse --verify --quiet "$against^{commit}" >/dev/null; then
  echo "proto-breaking: no revision $against; skipped"; exit 0
fi
if [ "$(git rev-parse "$against")" = "$(git rev-parse HEAD)" ]; then
  if ! git rev-parse --verify --quiet "HEAD~1^{commit}" >/dev/null; then
    echo "proto-breaking: HEAD has no parent; skipped"; exit 0
  fi
  against="HEAD~1"
fi
if ! git cat-file -e "$against:protos" 2>/dev/null; then
  echo "proto-breaking: $against has no protos/; skipped"; exit 0
fi
old="build/proto/against"
rm -rf "$old" && mkdir -p "$old"
git archive "$against" protos | tar -x -C "$old"
.venv/bin/python tools/protogen.py --descriptor-only --protos "$old/protos" --out "$old/medmesh.binpb"
.venv/bin/buf breaking build/proto/medmesh.binpb --against "$old/medmesh.binpb" --config buf.yaml
echo "proto-breaking: no breaking change against $against"
