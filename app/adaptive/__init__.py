"""Adaptive draft length (`num_draft_tokens = "auto"`): the gateway picks k per request, 0 included.

Whether drafting pays is a property of the machine and the pair (on the 2-core CPUs here it lost at
every k on the reference BLAS, 0.71x at 91 % acceptance, and wins with MKL, 1.52x at k = 5; on an H100 a
0.5B draft step costs as much as a 1.5B main step), so the choice is made from what each backend's own
requests measured, never from presets.

- estimator.py: the model (costs per round, acceptance per position and prompt class) and the choice
  of k, exploration included; plain arithmetic, no request, pool or metrics types.
- prompt_classes.py: the prompt class a request's acceptance is counted under.
- planner.py: per request, a `Plan` (app/proxy/plan.py) with the k and the twin under contention;
  learns from finished records.
- collector.py: the planner's figures for /metrics, computed at scrape time.
"""
