#!/bin/bash
# inet.sh up|down: a test-made "internet" namespace ns17-inet reachable from the host by routes:
# 198.51.100.10 (allowed in tests), 203.0.113.10 (denied in tests), 192.0.2.53 (a DNS server).
if [ "$1" = down ]; then ip netns del ns17-inet 2>/dev/null; ip link del vh17-inet 2>/dev/null; exit 0; fi
set -e
ip netns add ns17-inet
ip link add vh17-inet type veth peer name vn netns ns17-inet
ip addr add 10.199.0.1/30 dev vh17-inet; ip link set vh17-inet up
ip -n ns17-inet link set lo up; ip -n ns17-inet addr add 10.199.0.2/30 dev vn; ip -n ns17-inet link set vn up
for a in 198.51.100.10 203.0.113.10 192.0.2.53; do ip -n ns17-inet addr add $a/32 dev lo; done
ip -n ns17-inet route add default via 10.199.0.1
for n in 198.51.100.0/24 203.0.113.0/24 192.0.2.53/32; do ip route add $n via 10.199.0.2; done
