#!/bin/bash
cd /work/main
for i in 1 2 3 4; do
  t=$(date +%H%M)
  if [ $((i % 2)) = 1 ]; then sys=camrelay,mediamtx; else sys=mediamtx,camrelay; fi
  echo "$(date +%T) start p30-$i ($sys) load=$(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/s14/runs.log
  .venv/bin/python -m benchmarks.load --pin --source-apart --systems $sys --peers 1,30 --duration 15 --probes-at spread --no-plots --out /tmp/s14/res/p30-$t-$i > /tmp/s14/res/p30-$t-$i.log 2>&1
  echo "$(date +%T) end p30-$i rc=$?" >> /tmp/s14/runs.log
done
t=$(date +%H%M)
echo "$(date +%T) start burst8 load=$(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/s14/runs.log
.venv/bin/python -m benchmarks.burst --repeats 8 --hold 2 --baseline 4 --out /tmp/s14/res/burst8-$t > /tmp/s14/res/burst8-$t.log 2>&1
echo "$(date +%T) end burst8 rc=$?" >> /tmp/s14/runs.log
