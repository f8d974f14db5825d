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
END=$(date -u -d "18:20:15" +%s)  # the slot's end: a run that would not be done by then is not started
fits() { [ $(( $(date -u +%s) + $1 )) -le "$END" ] || { note "skipped $2: not done by the slot's end"; false; }; }
run() {
  fits 180 "$1" || return
  note "start $1"
  (cd "$2" && .venv/bin/python -m benchmarks.browser_latency --repeats 3 --duration 20 --fps "$3" --out "$R/$1" > "$R/$1.log" 2>&1)
  note "end $1 rc=$?"
}
# The branch again, its own page alone, the benchmark reading each frame's clock from the decoded frame (not the
# canvas, which costs the page's renderer 4-5 ms a frame): what the goal's measure is without the instrument's load.
frame_run() {
  fits 66 "$1" || return
  note "start $1"
  (cd "$2" && .venv/bin/python -m benchmarks.browser_latency --systems camrelay --repeats 2 --duration 20 --fps 60 \
    --clock-reader frame --out "$R/$1" > "$R/$1.log" 2>&1)
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
frame_run branch-60-frame $BRANCH
kill $POLL
note done
