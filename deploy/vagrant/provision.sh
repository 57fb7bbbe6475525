#!/usr/bin/env bash
# Provisions one Vagrant node: etcd (first node), twilld, the twill CNI plugin, then checks the
# pod network: a "pod" netns created through the plugin, pinging the pods of the nodes before it.
set -euo pipefail
apt-get update -qq
apt-get install -y -qq iproute2 iputils-ping jq etcd-client containernetworking-plugins >/dev/null
install -m 0755 /twill/target/release/twilld /usr/local/bin/twilld
install -D -m 0755 /twill/target/release/twill /opt/cni/bin/twill
install -D -m 0644 /twill/deploy/cni/10-twill.conflist /etc/cni/net.d/10-twill.conflist
ln -sf /usr/lib/cni/portmap /opt/cni/bin/portmap

if [ "$IS_ETCD" = 1 ]; then
  apt-get install -y -qq etcd-server >/dev/null
  sed "s/10.0.0.11/$ETCD_IP/" /twill/deploy/etcd/etcd.env | install -D -m 0644 /dev/stdin /etc/twill/etcd.env
  install -m 0644 /twill/deploy/etcd/etcd.service /etc/systemd/system/twill-etcd.service
  systemctl disable --now etcd 2>/dev/null || true
  systemctl daemon-reload && systemctl enable --now twill-etcd
  ETCDCTL_API=3 etcdctl --endpoints "http://$ETCD_IP:2379" put /coreos.com/network/config \
    "$(cat /twill/deploy/etcd/network-config.json)"
fi

sed "s#http://10.0.0.11:2379#http://$ETCD_IP:2379#; s/^#TWILLD_IFACE=.*/TWILLD_IFACE=$NODE_IP/" \
  /twill/deploy/systemd/twilld.env | install -D -m 0600 /dev/stdin /etc/twill/twilld.env
install -m 0644 /twill/deploy/systemd/twilld.service /etc/systemd/system/twilld.service
systemctl daemon-reload && systemctl enable --now twilld
for _ in $(seq 60); do [ -s /run/twill/subnet.env ] && break; sleep 1; done
twilld status

# A pod through the plugin, exactly as a runtime would call it.
ip netns add pod 2>/dev/null || true
CNI_COMMAND=ADD CNI_CONTAINERID=vagrant-pod CNI_NETNS=/var/run/netns/pod CNI_IFNAME=eth0 \
  CNI_PATH=/opt/cni/bin /opt/cni/bin/twill < <(jq -c '.plugins[0] + {cniVersion, name}' \
  /etc/cni/net.d/10-twill.conflist 2>/dev/null || echo '{"cniVersion":"1.0.0","name":"twill","type":"twill"}') \
  > /run/twill/pod.json
echo "pod on node$NODE_INDEX: $(ip netns exec pod ip -4 -o addr show eth0 | awk '{print $4}')"
ETCDCTL_API=3 etcdctl --endpoints "http://$ETCD_IP:2379" put "/twill-vagrant/pods/node$NODE_INDEX" \
  "$(ip netns exec pod ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)"
for other in $(ETCDCTL_API=3 etcdctl --endpoints "http://$ETCD_IP:2379" get --prefix --print-value-only /twill-vagrant/pods/); do
  ip netns exec pod ping -c 2 -W 2 "$other" >/dev/null && echo "reach $other: ok" || { echo "reach $other: FAILED"; exit 1; }
done
