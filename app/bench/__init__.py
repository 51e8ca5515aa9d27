"""`specgate bench`: evidence of whether speculation helps on this machine, and what the gateway costs.

Modules, one concern each:
  prompts.py         built-in prompt sets and prompt files
  stats.py           medians, spreads, percentiles, speed-ups (pure functions)
  client.py          one streamed request, timed on the client side; the gateway's /v1/models
  runner.py          the interleaved schedule: warm-up, repetitions, k sweep, progress
  results.py         samples -> per-profile results (equality with the baseline, best k)
  report.py          terminal table, Markdown, JSON
  plot.py            PNG plot (matplotlib, the `bench` extra)
  rawhttp.py         a minimal HTTP client for the overhead run (its own cost must not hide the gateway's)
  local.py           a gateway + tiny model on loopback, for runs that need no setup
  overhead.py        direct vs through-the-gateway, same backend, same request stream
  discrimination.py  the five-query tool/no-tool check
  cli.py             the command line
"""
