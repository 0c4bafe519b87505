#!/usr/bin/env bash
# `make bench-startup`: how long a new user waits. In a fresh clone of this repo, with empty
# uv, Go and medmesh caches: a cold `make setup`; then, warm, `make setup && medmesh up --detach`
# until everything is healthy (3 runs). Prints a table and writes build/bench/startup.json.
# COLD=0 skips the cold part (which downloads every dependency and builds FerretDB).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
clone="$work/clone"
cleanup() {
  (cd "$clone" 2>/dev/null && .venv/bin/medmesh down >/dev/null 2>&1) || true
  chmod -R u+w "$work" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
git clone -q "$root" "$clone"
cd "$clone"
# The warm runs move every port, so a developer's running platform is not disturbed.
export MEDMESH_PORT_OFFSET="${MEDMESH_PORT_OFFSET:-700}"
if [ "${COLD:-1}" = 1 ]; then
  export UV_CACHE_DIR="$work/uv" GOMODCACHE="$work/gomod" GOCACHE="$work/gocache" GOFLAGS=-modcacherw
  export MEDMESH_CACHE_DIR="$work/medmesh" PIP_NO_CACHE_DIR=1
fi
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
cold="null"
if [ "${COLD:-1}" = 1 ]; then
  t0=$(now); make setup >"$work/setup.log" 2>&1 || { tail -20 "$work/setup.log"; exit 1; }
  cold=$(since "$t0")
else
  make setup >/dev/null
fi
warm=()
platform=()
for _ in 1 2 3; do
  t0=$(now)
  out=$(make -s setup >/dev/null && .venv/bin/medmesh up --detach)
  warm+=("$(since "$t0")")
  platform+=("$(echo "$out" | sed -n 's/^medmesh: up in \([0-9.]*\)s$/\1/p')")
  .venv/bin/medmesh down >/dev/null
done
mkdir -p "$root/build/bench"
printf '{"cold_make_setup_s": %s, "warm_make_up_s": [%s], "platform_up_s": [%s]}\n' \
  "$cold" "$(IFS=,; echo "${warm[*]}")" "$(IFS=,; echo "${platform[*]}")" >"$root/build/bench/startup.json"
printf '%-44s %s\n' "cold make setup (empty caches)" "${cold} s"
printf '%-44s %s\n' "warm make setup && medmesh up --detach" "${warm[*]} s"
printf '%-44s %s\n' "  of which the platform starting (up in)" "${platform[*]} s"
echo "written: build/bench/startup.json"
