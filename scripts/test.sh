#!/usr/bin/env bash
# The project's test command: formatting, vet, and every package's tests
# under the race detector. Needs only Go (and gcc for -race); it fetches
# the modules it needs by itself.
#
#   ./scripts/test.sh              # the full suite
#   ./scripts/test.sh ./mesh/...   # some packages
#   GPUMESH_TEST_SHORT=1 ./scripts/test.sh   # skip the slow reliability tests
set -euo pipefail
cd "$(dirname "$0")/.."
# go-nvml's cgo calls NVML functions that nvml.h marks deprecated: ~150 lines
# of gcc warnings on a cold build. Only CGO_CFLAGS reaches a dependency's C
# compiler (a plain `go run` cannot silence them; see README).
export CGO_CFLAGS="${CGO_CFLAGS:--O2 -g} -Wno-deprecated-declarations"

if ! command -v go >/dev/null; then
	echo "test.sh: Go is not installed (https://go.dev/doc/install); gpumesh needs Go $(sed -n 's/^go //p' go.mod)" >&2
	exit 1
fi

# Tools some tests need beside Go; without them those tests skip, saying so.
# .ci/run installs them; on Debian: apt-get install python3-torch shellcheck
# systemd chromium iproute2 nftables.
missing=()
/usr/bin/python3 -c 'import torch' >/dev/null 2>&1 || missing+=("python3-torch (PyTorch backend, checkpoint and torchrun tests)")
command -v shellcheck >/dev/null || missing+=("shellcheck (user-data script check)")
command -v systemd-analyze >/dev/null || missing+=("systemd-analyze (unit sandbox score)")
command -v chromium >/dev/null || missing+=("chromium (dashboard page)")
if [ ${#missing[@]} -gt 0 ]; then
	echo "==> note: these tests will skip; this machine lacks:"
	printf '    %s\n' "${missing[@]}"
fi

pkgs=("$@")
[ ${#pkgs[@]} -eq 0 ] && pkgs=(./...)

echo "==> go mod download"
go mod download

echo "==> gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go') || true)
if [ -n "$unformatted" ]; then
	echo "these files are not gofmt'ed:" >&2
	echo "$unformatted" >&2
	exit 1
fi

echo "==> go vet"
go vet "${pkgs[@]}"

short=()
[ -n "${GPUMESH_TEST_SHORT:-}" ] && short=(-short)

echo "==> go test -race"
go test -race -count=1 -timeout 30m "${short[@]}" "${pkgs[@]}"
