#!/bin/bash
# camrelay 1,30,60 unpinned; perf record of the relay process over its 60-viewer point
cd /work/main
n=$1
out=/tmp/s14/res/spy60-$n
.venv/bin/python -m benchmarks.load --systems camrelay --peers 1,30,60 --duration 15 --no-plots --out $out > $out.log 2>&1 &
L=$!
for i in $(seq 200); do grep -q '"peers": 30' $out.log 2>/dev/null && break; sleep 1; done
pid=$(pgrep -f "python -m relay" | head -1)
sleep 8
.venv/bin/py-spy record -r 250 -d 18 -f raw -p $pid -o $out.spy.txt > /dev/null 2>&1
wait $L
