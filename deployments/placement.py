"""Where replicas run: custom resources per role and the SP group's placement group.

A cluster has node types per role (prefill on big multi-GPU nodes, decode on many smaller
ones). Each node type advertises a custom Ray resource (``ray start --resources``, KubeRay's
group ``resources``, the launcher's ``available_node_types.*.resources``) and each role's
``resources`` in the app config requires it, so Ray places a replica only on its node type.

A prefill replica is one SP group of ``sp`` ranks. With ``sp > 1`` or ``whole_node`` it gets
a Serve placement group (one per replica, created and removed with it): one bundle per rank,
``num_cpus``/``num_gpus`` each, ``STRICT_PACK`` so every rank is on one node (the SP
collectives stay on NVLink, never the network). Bundle 0 holds the replica actor itself
(rank 0) and carries the role's ``resources``; the other ranks' actors are created inside the
group (Serve captures child actors in it). With ``whole_node`` the prefill node type advertises
those resources once per node (e.g. ``prefill_node: 1``), so one group takes a node and no other
group or replica shares it.
"""

from __future__ import annotations

from deployments.config import PrefillSettings, ReplicaSettings


def actor_resources(settings: ReplicaSettings) -> dict:
    """The ``ray_actor_options`` entries that place one replica actor."""
    options = {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus}
    if settings.resources:
        options["resources"] = dict(settings.resources)
    return options


def _rank_bundle(settings: ReplicaSettings) -> dict[str, float]:
    bundle = {"CPU": settings.num_cpus}
    if settings.num_gpus > 0:
        bundle["GPU"] = settings.num_gpus
    return bundle


def sp_group_bundles(settings: PrefillSettings) -> list[dict[str, float]] | None:
    """One bundle per SP rank, the replica actor's (with the role's resources) first; None when
    a prefill replica needs no placement group (``sp == 1`` and not ``whole_node``)."""
    sp = settings.sp
    if sp == 1 and not settings.whole_node:
        return None
    first = {**_rank_bundle(settings), **settings.resources}
    return [first] + [_rank_bundle(settings) for _ in range(sp - 1)]


def prefill_placement(settings: PrefillSettings) -> dict:
    """Serve deployment options of a prefill pool's placement group (empty when none)."""
    bundles = sp_group_bundles(settings)
    if bundles is None:
        return {}
    return {"placement_group_bundles": bundles, "placement_group_strategy": "STRICT_PACK"}
