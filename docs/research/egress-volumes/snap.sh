#!/bin/bash
# snap.sh DIR: stop + migrate (x-ignore-shared) device state to DIR/device.state, then quit.
D=$1
./qmp.py $D/qmp.sock '{"execute":"stop"}' '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"x-ignore-shared","state":true}]}}' \
 "{\"execute\":\"migrate\",\"arguments\":{\"channels\":[{\"channel-type\":\"main\",\"addr\":{\"transport\":\"file\",\"filename\":\"$D/device.state\",\"offset\":0}}]}}"
for i in $(seq 100); do ./qmp.py $D/qmp.sock '{"execute":"query-migrate"}' | grep -q completed && break; sleep 0.1; done
./qmp.py $D/qmp.sock '{"execute":"query-migrate"}' | cut -c1-200
./qmp.py $D/qmp.sock '{"execute":"quit"}'; ls -la $D/device.state
