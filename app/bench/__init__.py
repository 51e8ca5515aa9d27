"""`specgate bench`: evidence of whether speculation helps on this machine, and what the gateway costs.

Modules, one concern each:
  prompts.py         built-in prompt sets and prompt files (editing.py: the `editing` set's files)
  sample_stats.py    medians, spreads, percentiles, speed-ups (pure functions)
  client.py          one streamed request, timed on the client side; the gateway's /v1/models
  runner.py          the interleaved schedule: warm-up, repetitions, k sweep, progress
  results.py         samples -> per-profile results (equality with the baseline, best k)
  report.py          terminal table, Markdown, JSON
  plot.py            PNG plot (matplotlib, the `bench` extra)
  machine.py         the machine a figure was measured on (CPU, memory, load, versions)
  rawhttp.py         a minimal HTTP client for the overhead run (its own cost must not hide the gateway's)
  local.py           a gateway + tiny model on loopback, for runs that need no setup
  overhead.py        direct vs through-the-gateway, same backend, same request stream
  discrimination.py  the five-query tool/no-tool check
  capacity.py        the scale model: nodes and queue limit for N users (queueing formulas, pure)
  capacity_command.py  `specgate bench capacity`: that model from measured figures
  tcp_relay.py       a bare byte relay: the floor of any proxy hop, for the overhead run
  arguments.py       command-line pieces the commands share (default URL, --profiles, output files)
  bench_command.py   `specgate bench` and its sub-commands' wiring
  batch_variance.py  `python -m app.bench.batch_variance`: is this BLAS batch-invariant (greedy equality)?
  roundcost.py       `python -m app.bench.roundcost`: what one verification pass costs, per size
"""
