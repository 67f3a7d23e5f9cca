"""The pruned model as data: one safetensors file, loadable without pickle and without changing the user's class.

It holds the pruned state dict and, as safetensors metadata, the model spec (zoo name or ``module:factory``) and
the pruning structure (which channels left which layer). ``pfq_edge.zoo.load_model(FILE)`` rebuilds the original
architecture, gives its layers the pruned shapes and loads the weights (strict).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "pfq-edge-pruned"
FORMAT_VERSION = "1"


def save_pruned(pruned_model, plan, spec: str, path: Path, source_weights: Path | None = None,
                model_args: dict | None = None) -> Path:
    """Write ``pruned_model``'s state dict with ``plan.structure()``, ``spec`` and the factory's ``model_args``
    to ``path`` (atomically)."""
    from safetensors.torch import save

    from pfq_edge.io import atomic_write_bytes

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": spec,
            "structure": json.dumps(plan.structure(), sort_keys=True), "tol": repr(plan.tol),
            "filters_removed": str(plan.filters_removed)}
    if model_args:
        meta["model_args"] = json.dumps(model_args, sort_keys=True)
    if source_weights is not None:
        meta["source_weights"] = Path(source_weights).name
        meta["source_weights_sha256"] = hashlib.sha256(Path(source_weights).read_bytes()).hexdigest()
    state = {k: v.detach().contiguous().clone() for k, v in pruned_model.state_dict().items()}
    atomic_write_bytes(Path(path), save(state, metadata=meta))
    return Path(path)
