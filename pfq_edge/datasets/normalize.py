"""Mean/std normalisation carried inside the model, so that every artefact takes pixels in [0, 1].

``with_input_normalization`` puts ``(x − mean) / std`` (per channel) in front of the user's model as two graph
nodes reading the buffers ``input_mean`` / ``input_std``; the layers keep their names, so PfQ's analysis, the
report and ``--from-step`` see the user's layers. quantize.py finds these nodes by those buffer names and puts the
model's input quantizer after them; FINN's streamlining absorbs the Sub/Div into the first thresholds, so the
accelerator takes UINT8 pixels.
"""

from __future__ import annotations

MEAN_BUFFER, STD_BUFFER = "input_mean", "input_std"


def normalize(x, mean, std):
    """(x − mean) / std per channel of x (N, C, H, W)."""
    import torch

    c = x.shape[1]
    return (x - torch.tensor(mean).view(1, c, 1, 1)) / torch.tensor(std).view(1, c, 1, 1)


def with_input_normalization(model, mean, std):
    """A torch.fx GraphModule computing ``model((x − mean) / std)``; shares the layers with ``model``. Raises
    ModelError if torch.fx cannot trace the model."""
    import torch
    from torch import fx

    from pfq_edge.errors import ModelError, one_line

    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise ModelError(f"cannot trace {type(model).__name__} with torch.fx: {one_line(exc, 200)}") from None
    c = len(mean)
    gm.register_buffer(MEAN_BUFFER, torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
    gm.register_buffer(STD_BUFFER, torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))
    graph = gm.graph
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    users = list(placeholder.users)
    with graph.inserting_after(placeholder):
        m = graph.get_attr(MEAN_BUFFER)
    with graph.inserting_after(m):
        s = graph.get_attr(STD_BUFFER)
    with graph.inserting_after(s):
        sub = graph.call_function(torch.sub, (placeholder, m))
    with graph.inserting_after(sub):
        div = graph.call_function(torch.div, (sub, s))
    for user in users:
        user.replace_input_with(placeholder, div)
    gm.recompile()
    gm.eval()
    return gm
