"""cwm_beam: the Beam data steps (traces, trajectories) and the program sources they draw on.

Execution itself (sandbox, tracer, trace format) is in :mod:`cwm_exec`; the ForagerAgent
(environments, tasks, tools, policies) in :mod:`cwm_forager`.
"""
