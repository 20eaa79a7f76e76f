"""Failures of a deployment-handle call that mean "no replica could serve it", not "bad request".

Raised by Serve when the target deployment has been deleted or is draining with nothing left
to route to (``DeploymentUnavailableError``), or when the replica that held the call died
(``RayActorError``, ``ActorUnavailableError``). Callers retry elsewhere, fall back, or answer
503 with ``Retry-After``.
"""

from __future__ import annotations

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

REPLICA_GONE = (DeploymentUnavailableError, RayActorError, ActorUnavailableError)
