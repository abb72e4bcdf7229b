#!/usr/bin/env bash
# Installs what building and testing llm-edge needs on Debian; safe to re-run
# (each step is skipped when already done).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

apt_packages=()
command -v cmake >/dev/null 2>&1 || apt_packages+=(cmake)
# llama.cpp's llama-server is built from source for the end-to-end tests
command -v make >/dev/null 2>&1 || apt_packages+=(make)
command -v g++ >/dev/null 2>&1 || apt_packages+=(g++)
command -v python3 >/dev/null 2>&1 || apt_packages+=(python3 python3-venv)
# a real Prometheus and promtool for the metrics tests (starts no daemon here)
command -v promtool >/dev/null 2>&1 || apt_packages+=(prometheus)
# a real sshd/ssh for the reverse-tunnel tests, autossh as the tunnel unit uses it
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || apt_packages+=(openssh-server)
command -v ssh >/dev/null 2>&1 || apt_packages+=(openssh-client)
command -v autossh >/dev/null 2>&1 || apt_packages+=(autossh)
# deterministic cost figures (benches/cost.rs): callgrind
command -v valgrind >/dev/null 2>&1 || apt_packages+=(valgrind)
# systemd's own unit verifier
command -v systemd-analyze >/dev/null 2>&1 || apt_packages+=(systemd)
# tests/shared.rs: the store several edges share, and a load balancer in front
command -v redis-server >/dev/null 2>&1 || apt_packages+=(redis-server)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || apt_packages+=(haproxy)
command -v openssl >/dev/null 2>&1 || apt_packages+=(openssl)   # tests/shared.rs: a TLS store
# packaging tests (tests/python/test_package.py): dpkg-deb's objdump, a Debian root
# booted with systemd-nspawn, podman (with runc) for the container image
command -v objdump >/dev/null 2>&1 || apt_packages+=(binutils)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || apt_packages+=(debootstrap)
command -v systemd-nspawn >/dev/null 2>&1 || apt_packages+=(systemd-container)
command -v podman >/dev/null 2>&1 || apt_packages+=(podman)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || apt_packages+=(runc)
# Node.js runs examples/node and drives the browser example (CI has Node 20)
command -v node >/dev/null 2>&1 || apt_packages+=(nodejs)
command -v npm >/dev/null 2>&1 || apt_packages+=(npm)
# a headless browser for examples/browser (driven by tests/browser)
[ -x /usr/bin/chromium ] || apt_packages+=(chromium)
if [ ${#apt_packages[@]} -gt 0 ]; then
  echo "installing Debian packages: ${apt_packages[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

# Python test clients (the official openai package, latest) in a project venv.
stamp=.venv/.requirements
if [ ! -x .venv/bin/python ] || ! cmp -s tests/python/requirements.txt "$stamp"; then
  echo "setting up .venv with tests/python/requirements.txt"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q --upgrade -r tests/python/requirements.txt
  cp tests/python/requirements.txt "$stamp"
fi

# Node packages of the examples and of the browser test driver, from their lock files.
for dir in examples/node tests/browser; do
  stamp="$dir/node_modules/.llm-edge-lock"
  if ! cmp -s "$dir/package-lock.json" "$stamp"; then
    echo "installing node packages in $dir"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    cp "$dir/package-lock.json" "$stamp"
  fi
done

# A real llama.cpp llama-server (pinned, built once into ~/.cache/llm-edge: 5-12 min
# the first time, instant after) and the tiny deterministic model it serves.
scripts/build-llama-server.sh >/dev/null
.venv/bin/python scripts/make-tiny-model.py >/dev/null

# The Debian bookworm roots the packaging tests boot and build images from
# (debootstrap once into ~/.cache/llm-edge: 4-6 min the first time, instant after).
$SUDO env LLM_EDGE_CACHE="${LLM_EDGE_CACHE:-$HOME/.cache/llm-edge}" scripts/make-test-rootfs.sh >/dev/null
