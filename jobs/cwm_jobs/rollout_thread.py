"""Asynchronous rollouts: a thread samples the next batches from a snapshot of the policy while
the trainer updates on the current one (CWM's RL is asynchronous, with stale trajectories
dropped).

The thread owns a copy of the model (the *snapshot*). Before each batch it loads the newest
weights the trainer has published, and tags the batch with their *policy version* (the number
of batches the trainer had finished when it published them). It may run at most ``ahead``
batches ahead of the batch the trainer is updating on: it takes a permit per batch and the
trainer returns one each time it takes a batch. So with ``ahead`` 1, batch ``b + 1`` is
generated (with the weights after batch ``b - 1``) while the trainer updates on batch ``b``,
and trains with a policy lag of 1, whatever the timing (so a run is reproducible); with more,
a slow trainer lets the thread run further ahead on older weights, and the trainer drops what
is staler than ``rl.maxPolicyLag`` (``cwm_jobs.grpo.drop_stale``). Which weights sample a batch
then depends on timing; the tasks and sampling seeds of each batch still depend only on (seed,
step, rank).

Generation and the optimiser's work overlap because PyTorch releases the GIL inside its ops.
Memory: the snapshot and one published copy of the weights beside the trainer's (the stage
refuses ZeRO-3, so every rank holds whole parameters to copy).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cwm_jobs.rollouts import Episode

LOG = logging.getLogger("cwm_jobs.rollout_thread")

#: (snapshot module, step, policy version) -> that step's episodes (tagged with the version)
Sampler = Callable[[torch.nn.Module, int, int], list[Episode]]


@dataclass
class RolloutBatch:
    """One step's episodes, the step they were drawn for, the policy version that sampled
    them, and how long sampling took."""
    step: int
    version: int
    episodes: list[Episode]
    seconds: float


def snapshot_of(module: torch.nn.Module) -> torch.nn.Module:
    """A separate copy of ``module`` for sampling: built anew from its config and loaded with
    its weights (a deepcopy would also copy the hooks DeepSpeed registers on the trained one)."""
    copy = type(module)(module.config)
    first = next(module.parameters())
    copy.to(device=first.device, dtype=first.dtype)
    copy.load_state_dict(module.state_dict())
    copy.requires_grad_(False)
    return copy.eval()


class RolloutThread:
    """Samples steps ``first`` .. ``last - 1`` in order on a thread; see the module docstring."""

    def __init__(self, module: torch.nn.Module, sample: Sampler, *, first: int, last: int,
                 ahead: int) -> None:
        if ahead < 1:
            raise ValueError(f"rl.rolloutsAhead must be >= 1 for the rollout thread, got {ahead}")
        self.snapshot = snapshot_of(module)
        self.version = first
        self._sample, self._steps = sample, range(first, last)
        self._permits = threading.Semaphore(ahead)
        self._ready: queue.Queue = queue.Queue()
        self._pending: tuple[int, dict[str, torch.Tensor]] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rl-rollouts", daemon=True)

    def start(self) -> RolloutThread:
        self._thread.start()
        return self

    def publish(self, module: torch.nn.Module, version: int) -> None:
        """Hand the trainer's weights after ``version`` batches to the thread (copied now; the
        thread loads them before its next batch)."""
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        with self._lock:
            self._pending = (version, state)

    def get(self) -> RolloutBatch:
        """The next batch, in step order; re-raises the thread's error if it failed."""
        while True:
            try:
                item = self._ready.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the rollout thread ended before sampling every step") \
                        from None
                continue
            if isinstance(item, BaseException):
                raise RuntimeError(f"the rollout thread failed: {item}") from item
            self._permits.release()
            return item

    def close(self) -> None:
        """Stop after the batch being sampled, if any, and wait for the thread."""
        self._stop.set()
        self._permits.release()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            for step in self._steps:
                while not self._permits.acquire(timeout=0.5):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                self._refresh()
                start = time.perf_counter()
                episodes = self._sample(self.snapshot, step, self.version)
                self._ready.put(RolloutBatch(step, self.version, episodes,
                                             time.perf_counter() - start))
        except BaseException as err:  # handed to the trainer, which raises it (get)
            LOG.exception("rollout thread failed")
            self._ready.put(err)

    def _refresh(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self.version = pending[0]
            self.snapshot.load_state_dict(pending[1])
