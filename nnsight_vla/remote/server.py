"""Server-side glue for serving nnsight-vla models from an NDIF deployment (``ndif`` 0.1.2, nnsight 0.8.1).

Imported only inside the NDIF server (it imports ``ray`` and ``ndif``); selected by variables set before
``ray start``: ``NDIF_CONTROLLER_IMPORT_PATH=nnsight_vla.remote.server.ControllerActor`` (required with nnsight 0.8.1)
and ``NDIF_MODEL_IMPORT_PATH=nnsight_vla.remote.server.ModelActor`` (GPU) or ``.CPUModelActor`` (CPU test servers).
All three check every model key against the operator's :class:`~.policy.ServerPolicy` BEFORE the key's class is
imported, and cap its size measured on the meta device before any weight exists (:func:`admit_and_size`).
"""

from __future__ import annotations

import gc
from typing import Any

import ray
from ndif.common.schema.controller import DeploymentConfig
from ndif.services.ray.deployments.controller.cluster.evaluator import CacheEntry, ModelEvaluator, _dtype_name
from ndif.services.ray.deployments.controller.controller import _ControllerActor
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from nnsight.modeling.mixins.remotable import CheckpointInfo, Remotable, bytes_per_element

from .policy import ServerPolicy


def admit_and_size(model_key: str, dtype: str) -> CheckpointInfo:
    """The policy's verdict on a full key, then its description, sized on the meta device and checked against the
    cap. The policy is read from the environment on each call (an operator's edit applies to the next deploy)."""
    policy = ServerPolicy.from_env()
    admitted = policy.admit(model_key)  # before Remotable resolves (imports) the class
    described = Remotable.describe_checkpoint(model_key, dtype)
    policy.check_size(described.size_bytes, admitted.tiny)
    return described


class Nnsight081Evaluator(ModelEvaluator):
    """ndif's evaluator, asking nnsight 0.8.1 about a checkpoint with the arguments 0.8.1 takes.

    ``trust_remote_code`` is still recorded on the cache entry (ndif compares it to decide whether to re-evaluate)
    but not passed to nnsight: in 0.8.1 it is part of the key.
    """

    def _entry(self, model_key: str, dtype: Any, trust_remote_code: bool) -> CacheEntry:
        resolved = _dtype_name(dtype)
        cached = self.cache.get(model_key)
        if cached is not None and cached.dtype == resolved and cached.trust_remote_code == trust_remote_code:
            return cached
        described = admit_and_size(model_key, resolved)
        n_params = described.n_params
        if n_params is None:
            n_params = round(described.size_bytes / bytes_per_element(resolved))
        entry = CacheEntry(
            described.size_bytes, n_params, described.config, described.revision, resolved, trust_remote_code,
            Remotable.max_tp_size(model_key),
        )
        self.cache[model_key] = entry
        return entry


class _Nnsight081Controller(_ControllerActor):
    """ndif's controller with :class:`Nnsight081Evaluator` installed before any deploy."""

    def __init__(self, deployments: list[str] = (), **kwargs: Any) -> None:
        # The parent deploys NDIF_DEPLOYMENTS inside __init__, before the evaluator could be swapped: hold them
        # back and deploy them once it is in place.
        super().__init__(deployments=[], **kwargs)
        stock = self.cluster.evaluator
        self.cluster.evaluator = Nnsight081Evaluator(
            padding_factor=stock.padding_factor,
            padding_bias=stock.padding_bias,
            tp_model_actor_class=stock.tp_model_actor_class,
        )
        pinned = [key for key in deployments if key]
        if pinned:
            self._deploy({key: DeploymentConfig(pinned=True) for key in pinned})


# The same Ray options as ndif's own ControllerActor: one CPU, pinned to the head node.
ControllerActor = ray.remote(num_cpus=1, num_gpus=0, max_restarts=-1, resources={"head": 1})(_Nnsight081Controller)


class _CPUModelDeployment(BaseModelDeployment):
    """ndif's model actor with the weights on the CPU instead of the assigned GPUs."""

    # Parking a replica (HOT->WARM) moves weights GPU->CPU; here they already are on the CPU, so an evicted
    # replica is torn down instead.
    CACHEABLE = False

    def load_from_disk(self) -> Any:
        # ndif's call with the placement replaced by the CPU; the key's class decides how dtype/device apply
        # (nnsight-vla: the key's dtype wins over the server default). The policy first, as on the GPU.
        admit_and_size(self.model_key, self.dtype_name)
        model = Remotable.from_model_key(self.model_key, dispatch=True, dtype=self.dtype_name, device="cpu",
                                         **self.kwargs)
        model._module.requires_grad_(False)
        return model

    def cleanup(self) -> None:
        # ndif's cleanup ends with torch.cuda.synchronize(), which raises on a CPU build of torch.
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


CPUModelActor = ray.remote(num_cpus=1, max_restarts=-1)(_CPUModelDeployment)


class _GuardedModelDeployment(BaseModelDeployment):
    """ndif's GPU model actor, loading only keys the server's policy admits, within its size cap."""

    def load_from_disk(self) -> Any:
        admit_and_size(self.model_key, self.dtype_name)
        return super().load_from_disk()


ModelActor = ray.remote(num_cpus=1, max_restarts=-1)(_GuardedModelDeployment)
