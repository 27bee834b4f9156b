#!/bin/bash
# restore.sh SRC DST [extra qemu args]: restore SRC's snapshot into DST with the given devices, cont.
S=$1; D=$2; shift 2
t0=$(date +%s%N)
SRC=$S ./vm.sh restore $D "$@"
./qmp.py $D/qmp.sock '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"x-ignore-shared","state":true}]}}' \
 "{\"execute\":\"migrate-incoming\",\"arguments\":{\"channels\":[{\"channel-type\":\"main\",\"addr\":{\"transport\":\"file\",\"filename\":\"$S/device.state\",\"offset\":0}}]}}" >/dev/null
for i in $(seq 200); do [ -e /proc/$(cat $D/qemu.pid 2>/dev/null || echo 0) ] || { echo QEMU-EXITED; break; }; ./qmp.py $D/qmp.sock '{"execute":"query-status"}' 2>/dev/null | grep -q '"paused"\|postmigrate' && break; sleep 0.05; done
./qmp.py $D/qmp.sock '{"execute":"query-status"}' '{"execute":"cont"}'
echo restore_ms=$(( ($(date +%s%N)-t0)/1000000 )); cat $D/qemu.log
