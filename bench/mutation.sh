#!/usr/bin/env bash
# Mutation testing of the code that keeps, sends and deletes events (issue 17): the buffer
# (agent/buffer/{writer,reader,schema}.py), the uplink, agent/protocols/stxetx.py, the POS driver and
# the local API, with mutmut 3 as configured in pyproject.toml's [tool.mutmut].
# Slow, so it is not part of the test command. Runs niced and bounded: each mutant has mutmut's
# timeout (timeout_multiplier/timeout_constant), the whole run MUTATION_MAX_S seconds (default 2400);
# mutants not reached by then are reported as "not checked".
#
#   bench/mutation.sh                         # fresh run, 12 workers
#   MUTATION_CHILDREN=2 bench/mutation.sh     # gentler on a shared machine (about three times slower)
#   MUTATION_RESUME=1 bench/mutation.sh       # go on with an interrupted run (same code only)
#   MUTATION_REPORT_ONLY=1 bench/mutation.sh  # reprint the report of the last run
#
# Why 12 workers on 2 cores: a killed mutant is mostly a test waiting out its bounded wait (an ACK
# on a pty, an event at the broker: 10-30 s), so a worker sits at 0.5-3 % CPU; measured on 2 busy
# cores: 2 workers ~0.4 mutants/s (over two hours for the 2757), 6-10 workers 0.7-1.1/s, 20 workers
# 0.84/s on the slowest (buffer) mutants. All of it at nice 19.
#
# Needs the `mutation` extra: .venv/bin/python -m pip install -e '.[test,mutation]'
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
if [ ! -x "$ROOT/.venv/bin/mutmut" ]; then
  echo "mutation: mutmut is missing; run: $PY -m pip install -e '.[test,mutation]'" >&2
  exit 2
fi
"$PY" -c 'import bench.machine as m; m.print_machine()'

if [ "${MUTATION_REPORT_ONLY:-0}" != 1 ]; then
  # a fresh copy each time: results cached from another revision of the code would be stale
  if [ "${MUTATION_RESUME:-0}" != 1 ]; then rm -rf mutants; fi
  mkdir -p mutants
  start=$(date +%s)
  status=0
  # mutmut draws a progress line with carriage returns: keep its output in a log, not on the terminal
  timeout --signal=INT --kill-after=60 "${MUTATION_MAX_S:-2400}" \
    nice -n 19 "$ROOT/.venv/bin/mutmut" run --max-children "${MUTATION_CHILDREN:-12}" \
    >>mutants/run.log 2>&1 || status=$?
  echo "mutation: mutmut run exited $status after $(( $(date +%s) - start )) s (log: mutants/run.log)"
  if [ "$status" -ne 0 ]; then tail -n 20 mutants/run.log | tr '\r' '\n' | tail -n 20 >&2; fi
fi
nice -n 19 "$PY" -m bench.mutation_report
