#!/usr/bin/env bash
# Makes a CA, an etcd server certificate and client certificates with openssl.
#   deploy/tls/make-certs.sh OUT_DIR ETCD_IP [ETCD_IP...]
# Writes OUT_DIR/{ca,etcd,twilld,twill-admin,root}{,-key}.pem. The client certificates' common
# names are etcd user names once etcd's auth is on (deploy/etcd/roles.sh): twilld for the
# nodes, twill-admin for people managing policies with twillctl, root for etcd's own admin.
# The test suite runs this script to check the recipe works against a real etcd.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR ETCD_IP [ETCD_IP...]}
shift
[ $# -ge 1 ] || { echo "usage: $0 OUT_DIR ETCD_IP [ETCD_IP...]" >&2; exit 2; }
mkdir -p "$out"
cd "$out"
umask 077

san="IP:127.0.0.1"
for ip in "$@"; do san="$san,IP:$ip"; done

openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=twill-etcd-ca" \
  -keyout ca-key.pem -out ca.pem 2>/dev/null

cert() { # name cn usage san
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
  printf 'extendedKeyUsage=%s\n%s' "$3" "${4:+subjectAltName=$4}" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 825 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
cert etcd etcd serverAuth,clientAuth "$san"
cert twilld twilld clientAuth ""
cert twill-admin twill-admin clientAuth ""
cert root root clientAuth ""
rm -f ca.srl
echo "wrote $(pwd)/{ca,etcd,twilld,twill-admin,root}{,-key}.pem"
