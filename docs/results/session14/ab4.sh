#!/bin/bash
cd /work/main
orders=("camrelay,camrelay_base,mediamtx" "mediamtx,camrelay_base,camrelay" "camrelay_base,camrelay,mediamtx")
for i in 1 2 3; do
  t=$(date +%H%M)
  echo "$(date +%T) start answerab$i load=$(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/s14/runs.log
  .venv/bin/python -m benchmarks.load --systems ${orders[$((i-1))]} --base-tree /tmp/s14/headbase --peers 1,30,60 --duration 15 --no-plots --out /tmp/s14/res/answerab-$t > /tmp/s14/res/answerab-$t.log 2>&1
  echo "$(date +%T) end answerab$i rc=$?" >> /tmp/s14/runs.log
done
