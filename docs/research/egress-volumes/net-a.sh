#!/bin/bash
# net-a.sh up|down I : per-machine network namespace ns17-mI with a TAP (tap0) that looks like slirp's
# gateway (10.0.2.2, MAC 02:fc:00:00:00:01) and DNS (10.0.2.3), a veth to the host, NAT, and an
# nftables egress table whose sets the server would rewrite.
set -e
op=$1; i=$2; N=ns17-m$i
if [ $op = down ]; then ip netns del $N 2>/dev/null; ip link del vh17-$i 2>/dev/null; exit 0; fi
ip netns add $N
ip link add vh17-$i type veth peer name vn netns $N
ip addr add 10.200.$i.1/30 dev vh17-$i; ip link set vh17-$i up
ip -n $N link set lo up; ip -n $N addr add 10.200.$i.2/30 dev vn; ip -n $N link set vn up
ip -n $N route add default via 10.200.$i.1
ip -n $N tuntap add tap0 mode tap
ip -n $N link set tap0 address 02:fc:00:00:00:01
ip -n $N addr add 10.0.2.2/24 dev tap0; ip -n $N addr add 10.0.2.3/32 dev tap0; ip -n $N link set tap0 up
ip netns exec $N sysctl -qw net.ipv4.ip_forward=1
ip netns exec $N nft -f - <<NFT
table ip nat {
  chain post { type nat hook postrouting priority 100; oifname "vn" masquerade
  }
}
NFT
ip netns exec $N nft -f ${R17:-/tmp/research-17}/egress-table.nft
