#!/bin/bash
# A/B: HEAD (batch the late frames) vs the old hub rule, 1,30,60 unpinned
cd /work/main
for i in 1 2 3 4; do
  t=$(date +%H%M)
  echo "$(date +%T) start batchab$i load=$(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/s14/runs.log
  if [ $((i % 2)) = 1 ]; then sys=camrelay,camrelay_base; else sys=camrelay_base,camrelay; fi
  .venv/bin/python -m benchmarks.load --systems $sys --base-tree /tmp/s14/oldhub --peers 1,30,60 --duration 15 --no-plots --out /tmp/s14/res/batchab-$t > /tmp/s14/res/batchab-$t.log 2>&1
  echo "$(date +%T) end batchab$i rc=$?" >> /tmp/s14/runs.log
done
