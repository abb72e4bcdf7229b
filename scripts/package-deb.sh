#!/usr/bin/env bash
# Builds the Debian package of llm-edge with dpkg-deb from packaging/deb/.
#
#   scripts/package-deb.sh [--binary PATH] [--out DIR] [--compress xz|gzip|none]
#
# Without --binary it builds the gateway with the `dist` profile (release, thin
# LTO, no debug info) into $CARGO_TARGET_DIR (default target/). Prints the path
# of the .deb on stdout; the rest goes to stderr.
#
# The package: /usr/bin/llm-edge; llm-edge.service in /lib/systemd/system (its
# binary path rewritten to /usr/bin); /etc/llm-edge/llm-edge.yaml, a conffile
# made from conf/llm-edge.yaml with an empty key list and the /run/llm-edge
# paths the unit expects; the Machine A units, the Grafana dashboard and the
# Prometheus files under /usr/share/doc/llm-edge/; postinst adds the system user
# llm-edge, postrm --purge removes it. Needs dpkg-deb, objdump (binutils) and python3.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
binary=""
out="$repo/target/deb"
compress=xz
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --compress) compress="$2"; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--out DIR] [--compress xz|gzip|none]" >&2; exit 2 ;;
  esac
done

log() { echo "package-deb: $*" >&2; }

if [ -z "$binary" ]; then
  log "building llm-edge with --profile dist"
  cargo build --profile dist --bin llm-edge >&2
  binary="${CARGO_TARGET_DIR:-$repo/target}/dist/llm-edge"
fi
[ -x "$binary" ] || { log "no executable at $binary"; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
# The newest glibc symbol version the binary needs sets the libc6 dependency.
glibc=$(objdump -T "$binary" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)
depends="libc6 (>= ${glibc}), libgcc-s1"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/llm-edge_${version}_${arch}"
doc="$root/usr/share/doc/llm-edge"
install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/llm-edge" \
  "$doc/systemd" "$doc/examples"

install -m 0755 "$binary" "$root/usr/bin/llm-edge"
sed 's#/usr/local/bin/llm-edge#/usr/bin/llm-edge#g' systemd/llm-edge.service \
  > "$root/lib/systemd/system/llm-edge.service"
chmod 0644 "$root/lib/systemd/system/llm-edge.service"

# The example config without its example key, with the unit's runtime paths.
python3 - conf/llm-edge.yaml "$root/etc/llm-edge/llm-edge.yaml" <<'PY'
import re, sys
src, dst = sys.argv[1:3]
lines = open(src).read().split("\n")
top = re.compile(r"^[a-z_]+:")
if "keys: []" in lines:
    start = None  # the example already lists no key
else:
    start = lines.index("keys:")  # a ValueError here: conf/llm-edge.yaml changed shape
if start is not None:
    end = next(i for i in range(start + 1, len(lines)) if top.match(lines[i]))
    # the comment (and blank lines) right above the next section belong to it
    while lines[end - 1].startswith("#") or not lines[end - 1].strip():
        end -= 1
    # the example entry stays as a comment, without the example key's digest
    entry = []
    for line in lines[start + 1:end]:
        if "the digest of" in line:
            continue
        if line.strip().startswith("sha256:"):
            line = line.split("sha256:")[0] + "sha256: <the digest llm-edge gen-key prints>"
        entry.append("#" + line[1:] if line.startswith("  ") else "# " + line)
    lines[start:end] = [
        "# No key is configured here: every request is refused (401) until you add one.",
        "#   llm-edge gen-key --id alice",
        "# prints the secret for the client and the lines to put below (in place of",
        "# the empty list); then `systemctl reload llm-edge`. An entry looks like:",
        "keys: []",
    ] + entry
text = "\n".join(lines)
for field, path in (("pid_file", "/run/llm-edge/llm-edge.pid"),
                    ("upgrade_sock", "/run/llm-edge/upgrade.sock")):
    text, n = re.subn(rf"(?m)^(\s+){field}: .*$", rf"\g<1>{field}: {path}", text)
    assert n == 1, f"{field}: {n} lines in {src}"
text = text.replace("--config conf/llm-edge.yaml", "--config /etc/llm-edge/llm-edge.yaml")
assert not re.search(r"(?m)^\s+sha256:", text), "a key digest is left in the packaged config"
open(dst, "w").write(text)
PY
chmod 0640 "$root/etc/llm-edge/llm-edge.yaml"

install -m 0644 README.md SECURITY.md CHANGELOG.md "$doc/"
install -m 0644 systemd/llama-server.service systemd/llama-tunnel@.service "$doc/systemd/"
install -m 0644 conf/grafana/llm-edge.json conf/prometheus/prometheus.yml \
  conf/prometheus/alerts.yml "$doc/examples/"
{
  echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
  echo "Upstream-Name: llm-edge"
  echo
  echo "Files: *"
  echo "License: Apache-2.0"
  echo " On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0."
} > "$doc/copyright"

sed -e "s/@VERSION@/${version}/" -e "s/@ARCH@/${arch}/" -e "s/@DEPENDS@/${depends}/" \
  packaging/deb/control.in > "$root/DEBIAN/control"
echo "Installed-Size: $(du -ks --exclude=DEBIAN "$root" | cut -f1)" >> "$root/DEBIAN/control"
install -m 0644 packaging/deb/conffiles "$root/DEBIAN/conffiles"
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$root/DEBIAN/"

mkdir -p "$out"
deb="$out/llm-edge_${version}_${arch}.deb"
dpkg-deb --root-owner-group "-Z$compress" --build "$root" "$deb" >&2
log "built $deb"
echo "$deb"
