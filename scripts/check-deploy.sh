#!/usr/bin/env bash
# Checks the deployment artifacts offline (no container engine or cluster is
# needed): the Dockerfile's structure (deploy/check_dockerfile.py: multi-stage,
# non-root, a volume, a health check), the Kubernetes manifests against the API's schemas
# (kubernetes-validate, strict: an unknown field fails), the compose file
# against the Compose specification, HAProxy's configuration with haproxy -c,
# the alert rules and Prometheus configuration with promtool, and the Grafana
# dashboard regenerated from deploy/grafana/dashboard.py (Grafana's Foundation
# SDK) must equal the committed JSON. The Python tools are pinned in
# deploy/requirements.txt and installed once into a cached virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

env_dir="${REALM_DEPLOY_ENV:-$HOME/.cache/realm/deploy-env}"
stamp="$env_dir/.requirements"
if ! cmp -s deploy/requirements.txt "$stamp" 2>/dev/null; then
  echo "==> installing the deployment checkers into $env_dir" >&2
  python3 -m venv "$env_dir"
  "$env_dir/bin/pip" install --quiet --disable-pip-version-check -r deploy/requirements.txt
  cp deploy/requirements.txt "$stamp"
fi

echo "==> Dockerfile (structure: multi-stage, non-root, volume, health check)" >&2
"$env_dir/bin/python" deploy/check_dockerfile.py Dockerfile

echo "==> Kubernetes manifests (kubernetes-validate --strict, 1.30 and 1.33)" >&2
for version in 1.30 1.33; do
  "$env_dir/bin/kubernetes-validate" --quiet --strict -k "$version" deploy/kubernetes/*.yaml
done

echo "==> docker-compose.yml (the Compose specification)" >&2
"$env_dir/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose/docker-compose.yml

echo "==> haproxy.cfg (haproxy -c)" >&2
REALM_LISTEN=127.0.0.1:8080 HAPROXY_STATS=127.0.0.1:8404 \
  REALM_HOST_1=127.0.0.1:8081 REALM_HOST_2=127.0.0.1:8082 REALM_HOST_3=127.0.0.1:8083 \
  haproxy -c -q -f deploy/haproxy/haproxy.cfg

echo "==> alert rules and Prometheus configuration (promtool)" >&2
promtool check rules deploy/prometheus/alerts.yml
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The compose file mounts the rules at /etc/prometheus; point at the repository's.
sed "s|/etc/prometheus/alerts.yml|$PWD/deploy/prometheus/alerts.yml|" \
  deploy/compose/prometheus.yml > "$tmp/prometheus.yml"
promtool check config "$tmp/prometheus.yml"

echo "==> Grafana dashboard (regenerated with Grafana's Foundation SDK)" >&2
"$env_dir/bin/python" deploy/grafana/dashboard.py > "$tmp/realm.json"
if ! diff -u deploy/grafana/realm.json "$tmp/realm.json"; then
  echo "deploy/grafana/realm.json is not what deploy/grafana/dashboard.py writes; regenerate it:" >&2
  echo "  $env_dir/bin/python deploy/grafana/dashboard.py > deploy/grafana/realm.json" >&2
  exit 1
fi
echo "deployment artifacts: ok" >&2
