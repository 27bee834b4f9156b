#!/bin/sh
# Runs inside pasta's new user+network namespace (as the unprivileged user, root in the userns).
set -e
ip tuntap add tap0 mode tap
ip link set tap0 address 02:fc:00:00:00:01
ip addr add 10.0.2.2/24 dev tap0; ip addr add 10.0.2.3/32 dev tap0; ip link set tap0 up
sysctl -qw net.ipv4.ip_forward=1
UP=$(ip -o route show default | awk '{print $5}')
nft -f - <<NFT
table ip nat {
  chain post { type nat hook postrouting priority 100; oifname "$UP" masquerade
  }
}
NFT
sed "s/\"vn\"/\"$UP\"/g" ${R17:-/tmp/research-17}/egress-table.nft | nft -f -
echo "uplink=$UP"; ip -br addr; echo READY
exec sleep 100000
