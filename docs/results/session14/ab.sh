#!/bin/bash
# A/B: HEAD vs no-retransmit tree, 1,30,60 unpinned
cd /work/main
for i in 1 2; do
  t=$(date +%H%M)
  echo "$(date +%T) start ab$i load=$(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/s14/runs.log
  if [ $i = 1 ]; then sys=camrelay,camrelay_base; else sys=camrelay_base,camrelay; fi
  .venv/bin/python -m benchmarks.load --systems $sys --base-tree /tmp/s14/noresend --peers 1,30,60 --duration 15 --no-plots --out /tmp/s14/res/noresend-$t > /tmp/s14/res/noresend-$t.log 2>&1
  echo "$(date +%T) end ab$i rc=$?" >> /tmp/s14/runs.log
done
