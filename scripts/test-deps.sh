#!/usr/bin/env bash
# Installs what the tests need, idempotently and quickly when all is there:
#   - the real Prometheus and Alertmanager from Debian (apt, as root);
#   - kube-apiserver, kubectl, etcd and helm, built with this machine's Go toolchain from the Go
#     module proxy into .cache/bin/ (git-ignored), one file per pinned version, so a second run
#     builds nothing (tests/controlplane/versions.env holds the versions);
#   - the Python package with its test extras in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [ ! -x /usr/bin/prometheus ] || [ ! -x /usr/bin/prometheus-alertmanager ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "prometheus and prometheus-alertmanager are missing; run this script as root (apt-get)" >&2
    exit 1
  fi
  apt-get update -q
  # --no-install-recommends: the binaries only; the packaged services are started by the tests.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus prometheus-alertmanager
fi

# shellcheck source=../tests/controlplane/versions.env
source tests/controlplane/versions.env
bin_dir=${GATEWAY_CANARY_TEST_BIN:-$root/.cache/bin}
mkdir -p "$bin_dir"

# build_once NAME VERSION COMMAND...: runs COMMAND (which writes "$out") unless NAME-VERSION exists.
build_once() {
  local name=$1 version=$2
  shift 2
  local target="$bin_dir/$name-$version"
  if [ -x "$target" ]; then
    return
  fi
  echo "building $name $version into $bin_dir (once per version; a cold build takes minutes)" >&2
  local started=$SECONDS
  out="$target.partial"
  "$@"
  mv -f "$out" "$target"
  echo "built $name $version in $((SECONDS - started)) s" >&2
}

require_pin() {  # require_pin GO_MOD MODULE VERSION: the go.mod and versions.env must agree.
  if ! grep -Eq "^(require )?[[:space:]]*$2 $3( |\$)" "$1"; then
    echo "$1 does not require $2 $3 (tests/controlplane/versions.env); update one to match the other" >&2
    exit 1
  fi
}

# kube_version_ldflags PACKAGE...: -X flags stamping KUBERNETES_VERSION into each version package.
# A module build has no git tree to stamp the version from; without them the binary reports
# v0.0.0-master, which clients treat as a pre-release.
kube_version_ldflags() {
  local v=${KUBERNETES_VERSION#v} pkg flags=""
  for pkg in "$@"; do
    flags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=${v%%.*}"
    flags+=" -X $pkg.gitMinor=$(echo "$v" | cut -d. -f2)"
  done
  echo "$flags"
}

build_kube_apiserver() {
  (cd tests/controlplane/apiserver && GOFLAGS="-mod=readonly -buildvcs=false" go build -trimpath -o "$out" \
    -ldflags "-s -w $(kube_version_ldflags k8s.io/component-base/version)" \
    k8s.io/kubernetes/cmd/kube-apiserver)
}

build_kubectl() {
  # Same module and pins as kube-apiserver. `kubectl version --client` reads component-base's
  # version; client-go's goes into the User-Agent it sends.
  (cd tests/controlplane/apiserver && GOFLAGS="-mod=readonly -buildvcs=false" go build -trimpath -o "$out" \
    -ldflags "-s -w $(kube_version_ldflags k8s.io/component-base/version k8s.io/client-go/pkg/version)" \
    k8s.io/kubernetes/cmd/kubectl)
}

build_etcd() {
  (cd tests/controlplane/etcd && GOFLAGS="-mod=readonly -buildvcs=false" go build -trimpath -ldflags "-s -w" -o "$out" .)
}

build_helm() {
  local gobin
  gobin=$(mktemp -d)
  # -X: `go install` does not stamp the release, so `helm version` would say only v3.N
  GOBIN=$gobin go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv "$gobin/helm" "$out"
  rmdir "$gobin"
}

require_pin tests/controlplane/apiserver/go.mod k8s.io/kubernetes "$KUBERNETES_VERSION"
require_pin tests/controlplane/etcd/go.mod go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
build_once kube-apiserver "$KUBERNETES_VERSION" build_kube_apiserver
build_once kubectl "$KUBERNETES_VERSION" build_kubectl
build_once etcd "$ETCD_VERSION" build_etcd
build_once helm "$HELM_VERSION" build_helm

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# checkov scans the chart's renderings (tests/test_chart.py). Its own virtualenv: its pinned
# dependencies would otherwise fight the project's. --skip-download keeps it offline.
CHECKOV_VERSION=3.3.30
if [ ! -x .cache/checkov/bin/checkov ] || [ ! -f ".cache/checkov/.installed-$CHECKOV_VERSION" ]; then
  python3 -m venv .cache/checkov
  .cache/checkov/bin/python -m pip install -q "checkov==$CHECKOV_VERSION"
  rm -f .cache/checkov/.installed-*
  touch ".cache/checkov/.installed-$CHECKOV_VERSION"
fi
