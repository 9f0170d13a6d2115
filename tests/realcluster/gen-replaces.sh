#!/usr/bin/env bash
# Print the go.mod replace block that pins every k8s.io staging module to the release matching
# k8s.io/kubernetes VERSION (default: the one go.mod requires).
# k8s.io/kubernetes requires its staging modules at v0.0.0 and finds them through ./staging
# replaces, which do not apply to modules that depend on it; without these pins the go tool
# fails with "unknown revision v0.0.0". Staging module vX.Y.Z pairs with v0.Y.Z.
# Usage: tests/realcluster/gen-replaces.sh [v1.37.2]   (paste the output into go.mod)
set -euo pipefail
cd "$(dirname "$0")"
version="${1:-$(go list -m -f '{{.Version}}' k8s.io/kubernetes)}"
staging="v0.${version#v1.}"
gomod="$(go mod download -json "k8s.io/kubernetes@${version}" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')"
echo "replace ("
awk -v pin="$staging" '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {printf "\t%s => %s %s\n", $1, $1, pin}' "$gomod"
echo ")"
