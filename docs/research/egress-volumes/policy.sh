#!/bin/sh
# policy.sh NS 'allow-cidrs' 'deny-cidrs' dns(0|1): atomically replace a machine's sets (one nft transaction).
NS=$1; A=$2; D=$3; DNS=$4
{ echo "flush set inet egress allow4"; echo "flush set inet egress deny4"; echo "flush set inet egress dns_on"
  [ -n "$A" ] && echo "add element inet egress allow4 { $A }"
  [ -n "$D" ] && echo "add element inet egress deny4 { $D }"
  [ "$DNS" = 1 ] && echo "add element inet egress dns_on { 10.0.2.3 }"; } | ip netns exec $NS nft -f -
