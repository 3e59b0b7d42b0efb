"""nnsight-vla: trace, read and steer robot Vision-Language-Action models with nnsight and TransformerLens.

    import nnsight_vla as nv
    vla = nv.tiny("openvla")                       # or nv.load("openvla", "path/or/hub-id")
    with vla.predict_action(image, "pick up the bowl") as tracer:
        for _ in tracer.iter[:]:
            vla.layers[2].mlp.act.output[..., [3, 7]] = 4.0
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import CheckpointError, IndexOutOfRangeError, InputError, UnknownFamilyError, VLAError

__version__ = "0.1.0"

# everything that needs torch / nnsight loads on first use, so `import nnsight_vla` (and the CLI) stays quick
_LAZY = {
    "VLA": "nnsight_vla.models", "families": "nnsight_vla.models", "load": "nnsight_vla.models",
    "tiny": "nnsight_vla.models",
    "ValueVectorLens": "nnsight_vla.lens",
    "find_concept": "nnsight_vla.concepts",
    "NeuronSet": "nnsight_vla.concepts",
    "Steering": "nnsight_vla.steering",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nnsight_vla' has no attribute {name!r}")


__all__ = ["VLAError", "UnknownFamilyError", "CheckpointError", "InputError", "IndexOutOfRangeError", *_LAZY]
