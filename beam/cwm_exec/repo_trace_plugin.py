"""pytest plugin that cuts a repository's test run into per-function trace episodes.

Loaded into a sandboxed ``pytest`` run by :mod:`cwm_exec.repository` (``-p
cwm_exec.repo_trace_plugin``); it traces only each test's *call* phase (not fixtures' set-up or
tear-down) with :class:`cwm_exec.tracer.EpisodeTracer` and appends one JSON line per finished
episode to the file named by ``CWM_EPISODES`` (flushed at once, so a run killed half-way keeps
what it traced). Configuration, from the environment:

``CWM_EPISODES``       output JSONL file (required: without it the plugin does nothing);
``CWM_TRACE_ROOT``     the repository root (only its non-test ``.py`` files are traced);
``CWM_TRACE_LIMITS``   ``TraceLimits`` as JSON;
``CWM_PER_FUNCTION``   episodes kept per function (default 3);
``CWM_MAX_EPISODES``   episodes in all (default 1000).
"""

from __future__ import annotations

import json
import os

import pytest

from cwm_exec.tracer import Episode, EpisodeTracer, TraceLimits

_OUT = os.environ.get("CWM_EPISODES")
_TRACER: EpisodeTracer | None = None


def pytest_configure(config) -> None:
    global _TRACER
    if not _OUT:
        return
    stream = open(_OUT, "a", encoding="utf-8")

    def emit(episode: Episode) -> None:
        stream.write(json.dumps(episode.to_json(), ensure_ascii=False) + "\n")
        stream.flush()

    limits = TraceLimits(**json.loads(os.environ.get("CWM_TRACE_LIMITS", "{}")))
    _TRACER = EpisodeTracer(os.environ.get("CWM_TRACE_ROOT", os.getcwd()), limits, emit,
                            per_function=int(os.environ.get("CWM_PER_FUNCTION", "3")),
                            max_episodes=int(os.environ.get("CWM_MAX_EPISODES", "1000")))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if _TRACER is None:
        yield
        return
    _TRACER.start(item.nodeid)
    try:
        yield
    finally:
        _TRACER.stop()
