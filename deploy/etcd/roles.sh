#!/usr/bin/env bash
# Turns on etcd's auth so a client certificate's common name decides what it may write:
#   twilld       (role twill-node):  read and write everything under the prefix (nodes create
#                                    lease keys no one can name in advance, so no narrower role
#                                    works for them)
#   twill-admin  (role twill-admin): read the prefix; write only policies/, namespaces/ and
#                                    pods/ (labels): people managing policy cannot move leases
#   root                             etcd's own administrator (needed to turn auth on)
#   deploy/etcd/roles.sh ENDPOINT PKI_DIR [PREFIX]
# Run once, with the certificates from deploy/tls/make-certs.sh in PKI_DIR.
set -euo pipefail
ep=${1:?usage: $0 ENDPOINT PKI_DIR [PREFIX]}
pki=${2:?usage: $0 ENDPOINT PKI_DIR [PREFIX]}
prefix=${3:-/coreos.com/network}
ctl() {
  ETCDCTL_API=3 etcdctl --endpoints "$ep" --cacert "$pki/ca.pem" \
    --cert "$pki/root.pem" --key "$pki/root-key.pem" "$@" >/dev/null
}
ctl user add root --no-password
ctl role add twill-node
ctl role grant-permission twill-node --prefix=true readwrite "$prefix/"
ctl role add twill-admin
ctl role grant-permission twill-admin --prefix=true read "$prefix/"
for dir in policies namespaces pods; do
  ctl role grant-permission twill-admin --prefix=true readwrite "$prefix/$dir/"
done
ctl user add twilld --no-password
ctl user grant-role twilld twill-node
ctl user add twill-admin --no-password
ctl user grant-role twill-admin twill-admin
ctl auth enable
echo "etcd auth on: twilld (twill-node), twill-admin (twill-admin), root"
