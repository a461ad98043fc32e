#!/usr/bin/env bash
# Mutual TLS between the services: one CA, one certificate per service.
#   deploy/make-certs.sh DIR SERVICE [NAME_OR_IP...]
# writes DIR/SERVICE/{node.pem,node.key,ca.pem}: a certificate valid for SERVICE (the name compose services dial
# each other by), every name or IP given (the names other nodes dial), localhost and 127.0.0.1 (the in-container
# health probe). The CA is made on first use in DIR/ca and signs every later call's certificate; its key stays
# there: copy only DIR/SERVICE folders to the nodes.
#   deploy/make-certs.sh certs vision vision-node.example.com 10.0.0.5   # copy certs/vision to the vision node
#   deploy/make-certs.sh certs llm && deploy/make-certs.sh certs router   # certs/llm, certs/router: language node
set -euo pipefail
dir=${1:?usage: make-certs.sh DIR SERVICE [NAME_OR_IP...]}
service=${2:?usage: make-certs.sh DIR SERVICE [NAME_OR_IP...]}
shift 2
[[ $service =~ ^[A-Za-z0-9][A-Za-z0-9.-]*$ ]] || { echo "make-certs.sh: SERVICE must be a DNS name" >&2; exit 2; }
ca=$dir/ca out=$dir/$service
mkdir -p "$ca" "$out"
if [[ ! -f $ca/ca.key ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 -subj "/CN=dvd internal CA" \
    -keyout "$ca/ca.key" -out "$ca/ca.pem" 2>/dev/null
  chmod 600 "$ca/ca.key"  # signs service certificates: never copied to a node
fi
san="DNS:$service,DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san="$san,IP:$name"; else san="$san,DNS:$name"; fi
done
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=dvd $service" \
  -keyout "$out/node.key" -out "$out/node.csr" 2>/dev/null
openssl x509 -req -in "$out/node.csr" -CA "$ca/ca.pem" -CAkey "$ca/ca.key" -CAcreateserial -days 825 \
  -extfile <(printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\n' "$san") -out "$out/node.pem" 2>/dev/null
cp "$ca/ca.pem" "$out/ca.pem"
rm -f "$out/node.csr" "$ca/ca.srl"
echo "wrote $out/{node.pem,node.key,ca.pem} for: $san"
