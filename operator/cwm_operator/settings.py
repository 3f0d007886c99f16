"""The operator's settings: read once from the environment (the Helm chart sets it).

Everything the operator needs that is not in a CWMPipeline's spec: default images, where GPU
stages land, how long a child may sit Pending before we say so, how retries back off. Tests build
a :class:`Settings` directly with a fast profile (:meth:`Settings.fast`).

Environment variables (all optional):

=================================  ==========================================================
``CWM_BEAM_IMAGE``                 default image of the data-generation Jobs
``CWM_TRAINER_IMAGE``              default image of the training PyTorchJobs
``CWM_IMAGE_PULL_POLICY``          ``IfNotPresent`` (default), ``Always`` or ``Never``
``CWM_GPU_NODE_SELECTOR``          JSON object, merged under a GPU stage's own nodeSelector
``CWM_GPU_TOLERATIONS``            JSON list of tolerations added to GPU stages
``CWM_STUCK_SECONDS``              a child Pending/Restarting this long is reported (900)
``CWM_RETRY_BACKOFF_SECONDS``      first retry delay; doubles per attempt (30)
``CWM_RETRY_BACKOFF_MAX_SECONDS``  cap of the retry delay (900)
``CWM_CHILD_SERVICE_ACCOUNT``      serviceAccountName of the children's pods (none: default)
``CWM_CLEAN_POD_POLICY``           PyTorchJob runPolicy.cleanPodPolicy: None (default), Running, All
``CWM_SANDBOX_MODE``               how pods that run untrusted code isolate it: ``bwrap``
                                   (default: bubblewrap required, under a Localhost seccomp
                                   profile) or ``rlimits`` (weaker; see cwm_exec.sandbox)
``CWM_SANDBOX_SECCOMP_PROFILE``    that Localhost profile, relative to the kubelet's seccomp
                                   folder (``cwm-sandbox.json``)
=================================  ==========================================================
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

PULL_POLICIES = ("IfNotPresent", "Always", "Never")
CLEAN_POD_POLICIES = ("None", "Running", "All")
SANDBOX_MODES = ("bwrap", "rlimits")


class SettingsError(ValueError):
    """An environment variable holds a value the operator cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    """Operator-wide knobs (immutable; pass a new one to change them)."""

    beam_image: str | None = None
    trainer_image: str | None = None
    image_pull_policy: str = "IfNotPresent"
    gpu_node_selector: Mapping[str, str] = field(default_factory=dict)
    gpu_tolerations: tuple[Mapping[str, Any], ...] = ()
    stuck_seconds: float = 900.0
    retry_backoff_seconds: float = 30.0
    retry_backoff_max_seconds: float = 900.0
    service_account: str | None = None
    clean_pod_policy: str = "None"
    sandbox_mode: str = "bwrap"
    sandbox_seccomp_profile: str = "cwm-sandbox.json"
    #: In-place restarts of a training stage's pods (PyTorchJob `runPolicy.backoffLimit`, pods
    #: `OnFailure`) before the attempt fails: a lost pod is recreated by the training operator
    #: and the stage resumes from its last checkpoint without a new attempt.
    training_restarts: int = 3

    def __post_init__(self) -> None:
        if self.image_pull_policy not in PULL_POLICIES:
            raise SettingsError(f"CWM_IMAGE_PULL_POLICY {self.image_pull_policy!r} is not one of "
                                f"{', '.join(PULL_POLICIES)}")
        if self.clean_pod_policy not in CLEAN_POD_POLICIES:
            raise SettingsError(f"CWM_CLEAN_POD_POLICY {self.clean_pod_policy!r} is not one of "
                                f"{', '.join(CLEAN_POD_POLICIES)}")
        if self.sandbox_mode not in SANDBOX_MODES:
            raise SettingsError(f"CWM_SANDBOX_MODE {self.sandbox_mode!r} is not one of "
                                f"{', '.join(SANDBOX_MODES)}")
        if self.sandbox_mode == "bwrap" and not self.sandbox_seccomp_profile:
            raise SettingsError("CWM_SANDBOX_SECCOMP_PROFILE is empty: bubblewrap needs a Localhost "
                                "seccomp profile in the pod (or set CWM_SANDBOX_MODE=rlimits)")
        for name in ("stuck_seconds", "retry_backoff_seconds", "retry_backoff_max_seconds",
                     "training_restarts"):
            if getattr(self, name) < 0:
                raise SettingsError(f"CWM_{name.upper()} must not be negative")

    @property
    def default_images(self) -> dict[str, str]:
        """The shape `validation.parse_pipeline` and `plan.Target` take."""
        images = {"beam": self.beam_image, "trainer": self.trainer_image}
        return {k: v for k, v in images.items() if v}

    def retry_delay(self, failed_attempts: int) -> float:
        """Exponential backoff before the next attempt: base, 2·base, 4·base … capped."""
        exponent = max(failed_attempts - 1, 0)
        return min(self.retry_backoff_max_seconds, self.retry_backoff_seconds * 2.0**exponent)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def number(name: str, default: float) -> float:
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                return float(raw)
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a number") from None

        def parsed(name: str, kind: type, default: Any) -> Any:
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as err:
                raise SettingsError(f"{name} is not valid JSON: {err}") from None
            if not isinstance(value, kind):
                raise SettingsError(f"{name} must be a JSON {kind.__name__}")
            return value

        return cls(
            beam_image=env.get("CWM_BEAM_IMAGE") or None,
            trainer_image=env.get("CWM_TRAINER_IMAGE") or None,
            image_pull_policy=env.get("CWM_IMAGE_PULL_POLICY") or "IfNotPresent",
            gpu_node_selector={str(k): str(v) for k, v in
                               parsed("CWM_GPU_NODE_SELECTOR", dict, {}).items()},
            gpu_tolerations=tuple(parsed("CWM_GPU_TOLERATIONS", list, [])),
            stuck_seconds=number("CWM_STUCK_SECONDS", 900.0),
            retry_backoff_seconds=number("CWM_RETRY_BACKOFF_SECONDS", 30.0),
            retry_backoff_max_seconds=number("CWM_RETRY_BACKOFF_MAX_SECONDS", 900.0),
            service_account=env.get("CWM_CHILD_SERVICE_ACCOUNT") or None,
            clean_pod_policy=env.get("CWM_CLEAN_POD_POLICY") or "None",
            sandbox_mode=env.get("CWM_SANDBOX_MODE") or "bwrap",
            sandbox_seccomp_profile=env.get("CWM_SANDBOX_SECCOMP_PROFILE") or "cwm-sandbox.json",
            training_restarts=int(number("CWM_TRAINING_RESTARTS", 3)),
        )

    def fast(self, **changes: Any) -> Settings:
        """A test profile: sub-second backoff and a short stuck threshold."""
        base = {"retry_backoff_seconds": 0.2, "retry_backoff_max_seconds": 1.0,
                "stuck_seconds": 2.0}
        return replace(self, **{**base, **changes})
