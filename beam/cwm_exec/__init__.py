"""cwm_exec: running untrusted Python and recording what it does, shared by data generation
(cwm_beam, cwm_forager) and training (cwm_jobs' rewards, evaluation and debugger).

    sandbox.py            bubblewrap + rlimits + cgroup limits; TracePool (a fork server)
    _exec_limited.py      the exec wrapper that applies a child's limits (no Python after fork)
    _zygote.py            the fork server's side of TracePool
    tracer.py             line-level tracing of one call into CWM's frames
    _ctracer.c            the tracer's recorder in C (same output as tracer's Python recorder)
    trace_format.py       CWM's trace text: special tokens, frames, parsing
    repository.py         a repository's tests run under the tracer, cut into episodes
    repo_trace_plugin.py  the pytest plugin repository.py loads inside the sandbox

Its own package because both sides need it and neither should import the other: training never
imports Beam, Beam never imports training.
"""
