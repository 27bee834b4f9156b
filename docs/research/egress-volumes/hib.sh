#!/bin/bash
# hib.sh DIR OUT: stop + full migration to OUT, quit.
D=$1; O=$2; t0=$(date +%s%N)
./qmp.py $D/qmp.sock '{"execute":"stop"}' '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"x-ignore-shared","state":false}]}}' '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1099511627776}}' "{\"execute\":\"migrate\",\"arguments\":{\"channels\":[{\"channel-type\":\"main\",\"addr\":{\"transport\":\"file\",\"filename\":\"$O\",\"offset\":0}}]}}" >/dev/null
for i in $(seq 300); do ./qmp.py $D/qmp.sock '{"execute":"query-migrate"}' | grep -q completed && break; sleep 0.1; done
echo hibernate_ms=$(( ($(date +%s%N)-t0)/1000000 )); ./qmp.py $D/qmp.sock '{"execute":"quit"}' >/dev/null
