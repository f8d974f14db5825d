#!/bin/bash
# Issue 16's 60 fps figures, main against this branch, in the benchmark slot (18:00-18:20 UTC): the worker's
# stages of each, then `benchmarks.browser_latency --repeats 3 --duration 20` at 60 fps alternated, then 30 fps once
# each. The load average at every start and end goes to slot.log. Main's from /work/main with its own venv. Beside them,
# the running relay's capture-to-hub delay every 5 s (pipeline.jsonl).
R=/work/wt-sixty/docs/results/issue16-sixty
MAIN=/work/main
BRANCH=/work/wt-sixty
note() { echo "$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg) $*" >> $R/slot.log; }
stages() {
  note "start stages-$1"
  (cd "$2" && PYTHONPATH=. .venv/bin/python $R/stages.py --frames 300 > $R/stages-$1.json 2>&1)
  note "end stages-$1"
}
run() {
  note "start $1"
  (cd "$2" && .venv/bin/python -m benchmarks.browser_latency --repeats 3 --duration 20 --fps "$3" --out "$R/$1" > "$R/$1.log" 2>&1)
  note "end $1 rc=$?"
}
$BRANCH/.venv/bin/python $R/pipeline_poll.py --every 5 --until 18:21 --cwd $MAIN --cwd $BRANCH > $R/pipeline.jsonl 2>&1 &
POLL=$!
stages main $MAIN
stages branch $BRANCH
run main-60-1 $MAIN 60
run branch-60-1 $BRANCH 60
run main-60-2 $MAIN 60
run branch-60-2 $BRANCH 60
run main-30 $MAIN 30
run branch-30 $BRANCH 30
kill $POLL
note done
