"""The KV backends of a replica, built from the app config (``AppConfig.transports``).

Decode offers one destination per backend, in the configured order; prefill has a sender
for each and writes through the first offer it can reach (``cuda_ipc`` only to a decode
replica on its own node; ``nccl``/``gloo`` and the object store anywhere).
"""

from __future__ import annotations

import ray
import torch

from deployments.config import AppConfig
from disagg.transport.base import KVReceiver, KVSender
from disagg.transport.direct import CUDA_IPC, DirectKVReceiver, DirectKVSender
from disagg.transport.ray_object_store import (
    BACKEND as OBJECT_STORE,
)
from disagg.transport.ray_object_store import (
    RayObjectStoreKVReceiver,
    RayObjectStoreKVSender,
    actor_owner,
)


def node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def build_receivers(config: AppConfig, device: torch.device) -> tuple[KVReceiver, ...]:
    receivers = []
    for name in config.transports:
        if name == CUDA_IPC:
            receivers.append(DirectKVReceiver(CUDA_IPC, node_id()))
        elif name == OBJECT_STORE:
            # Its destinations name this replica: prefill ends their leases if it dies.
            receivers.append(RayObjectStoreKVReceiver(owner=actor_owner()))
        else:
            from disagg.transport.torch_dist import TorchDistKVReceiver

            receivers.append(TorchDistKVReceiver(name, device=device, node=node_id()))
    return tuple(receivers)


def build_senders(config: AppConfig, device: torch.device) -> tuple[KVSender, ...]:
    senders = []
    for name in config.transports:
        if name == CUDA_IPC:
            senders.append(DirectKVSender(CUDA_IPC, node_id()))
        elif name == OBJECT_STORE:
            senders.append(RayObjectStoreKVSender(
                lease_s=config.prefill.lease_s,
                call_timeout_s=config.prefill.lease_call_timeout_s,
                owner_check_s=config.prefill.lease_owner_check_s))
        else:
            from disagg.transport.torch_dist import TorchDistKVSender

            senders.append(TorchDistKVSender(name, device=device))
    return tuple(senders)
