#!/usr/bin/env bash
# Mutual TLS between the nodes: one CA and one node certificate (valid for every name given, plus localhost and
# 127.0.0.1 for the healthchecks), written to DIR. Copy DIR to every node (the compose files mount it read-only).
#   deploy/make-certs.sh DIR vision-node.example.com language-node.example.com 10.0.0.5 ...
set -euo pipefail
dir=${1:?usage: make-certs.sh DIR NAME_OR_IP...}
shift
mkdir -p "$dir"
san="DNS:localhost,IP:127.0.0.1,DNS:llm"  # llm: the router reaches the language server by its compose name
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san="$san,IP:$name"; else san="$san,DNS:$name"; fi
done
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 -subj "/CN=dvd internal CA" \
  -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=dvd node" \
  -keyout "$dir/node.key" -out "$dir/node.csr" 2>/dev/null
openssl x509 -req -in "$dir/node.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial -days 825 \
  -extfile <(printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\n' "$san") -out "$dir/node.pem" 2>/dev/null
rm -f "$dir/node.csr" "$dir/ca.srl"
chmod 600 "$dir/ca.key"  # signs node certificates: keep it off the nodes
echo "wrote $dir/{ca.pem,node.pem,node.key} for: $san "
