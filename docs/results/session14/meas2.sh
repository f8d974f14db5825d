#!/bin/bash
cd /work/main
for fps in 30 60; do
  t=$(date +%H%M)
  echo "$(date +%T) start browser$fps load=$(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/s14/runs.log
  .venv/bin/python -m benchmarks.browser_latency --repeats 3 --duration 20 --fps $fps --clock-reader frame > /tmp/s14/res/browser$fps-$t.log 2>&1
  echo "$(date +%T) end browser$fps rc=$?" >> /tmp/s14/runs.log
done
t=$(date +%H%M)
echo "$(date +%T) start burst8b load=$(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/s14/runs.log
.venv/bin/python -m benchmarks.burst --repeats 8 --hold 2 --baseline 4 --out /tmp/s14/res/burst8b-$t > /tmp/s14/res/burst8b-$t.log 2>&1
echo "$(date +%T) end burst8b rc=$?" >> /tmp/s14/runs.log
