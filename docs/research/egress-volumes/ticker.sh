#!/bin/sh
while true; do date +%s.%N; sleep 0.05; done
