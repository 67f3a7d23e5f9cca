"""PfQ plan: which constant filters are removed, with which compensations, and which are neutralized or left.

Method from arXiv:2011.06751 as read in shared/design.md §3–4: filter c with constant post-activation output a_c is
deleted (conv output channel, BN channel); every dense consumer gets b_o += a_c·Σ_{kh,kw} K[o,c,kh,kw] (or, if it is
bias-free and followed by BN, that BN's running_mean −= the same amount); a depthwise consumer's channel c becomes
constant too, is removed, and its constant is carried on. That is exact where a_c = 0 or no zero padding touches the
constant. Where a non-zero constant meets zero padding (a padded conv, depthwise conv or average pool reads it: at
the borders it sees 0, not a_c, so its output is not constant there), rule "exact" neutralizes the filter instead
(below) and the function is kept exactly; rule "bn-epsilon" removes it anyway (approximate, guarded by data).

Channels are followed through conv → BN → activation chains, depthwise convs, pooling (modules or functions),
spatial means, flatten / ``view(N, -1)``, concat (every copy), dense convs and linear layers, and through an
element-wise add when every member of the add is constant on that channel (each member's filter is removed with
it, the sum carried on: design.md §3). A constant filter whose channel reaches an add with a non-constant member, a
grouped conv, a hard-coded reshape or the model output is neutralized instead (weights zeroed, BN mean 0: same
output, shapes kept); modules called at two places are left unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import math
import operator

import torch
from torch import fx, nn
from torch.nn import functional as F

from pfq_edge.pfq import DEFAULT_TOL, RULES
from pfq_edge.pfq.criterion import constant_mask
from pfq_edge.pfq.graph import (Chain, activation_of, call_counts, chain_from_conv, conv_chains, is_depthwise, is_flatten,
                            is_passthrough, is_spatial_mean, module_of, spatial_size)


@dataclass
class Removal:
    """Output channels ``channels`` of conv ``conv`` (and of its BN ``bn``) are deleted."""

    conv: str
    bn: str | None
    channels: list[int]
    depthwise: bool = False


@dataclass
class Compensation:
    """Consumer ``module`` loses inputs ``inputs``, each carrying the constant ``values[i]``.

    ``target`` says where Σ K·a goes: "bias", "new_bias" (a bias is added) or "bn_mean" (of ``bn``).
    """

    module: str
    inputs: list[int]
    values: list[float]
    target: str
    bn: str | None = None


@dataclass
class PruneGroup:
    """The constant filters of one producer chain and everything their removal touches."""

    producer: str
    channels: list[int]
    values: list[float]                  # a_c = f(β_c) for each removed channel
    removals: list[Removal]
    compensations: list[Compensation]
    exact: bool                          # True: no non-zero constant meets zero padding (identical output)
    inexact: list[str] = field(default_factory=list)  # where a constant meets padding (bn-epsilon, padded="remove")
    adds: list[str] = field(default_factory=list)     # element-wise adds crossed (every member constant there)


@dataclass
class Skipped:
    layer: str
    constant_filters: int
    reason: str


@dataclass
class Neutralized:
    """Constant filters that must stay for the shapes (add, concat with a dependent, grouped conv, model output):
    their weights are zeroed and BN running_mean set to 0, so the output stays β exactly while the folded weights
    no longer widen the layer's range."""

    conv: str
    bn: str
    channels: list[int]
    reason: str
    #: the short cause, for counts: "zero padding", "shape", "folding" (channel multiple), "last channel", "behind a
    #: kept filter" (``reason`` says it in full)
    why: str = "shape"


@dataclass
class PrunePlan:
    """What PfQ removes (``groups``), what it leaves and why (``skipped``), and ``warnings`` for the user."""

    groups: list[PruneGroup] = field(default_factory=list)
    neutralized: list[Neutralized] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tol: float = DEFAULT_TOL
    rule: str = "exact"
    channel_multiple: int = 1

    def removed_by_layer(self) -> dict[str, set[int]]:
        """{conv name: output channels deleted}, over every group (producers, depthwise followers, unused feeders)."""
        out: dict[str, set[int]] = {}
        for g in self.groups:
            for r in g.removals:
                out.setdefault(r.conv, set()).update(r.channels)
        return out

    @property
    def exact(self) -> bool:
        """Whether the pruned model computes the same function: every group exact and, under an approximate rule
        (bn-epsilon, near-constant), nothing neutralized either (a neutralized filter's output becomes β)."""
        return all(g.exact for g in self.groups) and (self.rule == "exact" or not self.neutralized)

    @property
    def filters_removed(self) -> int:
        """Filters deleted in all layers (a constant filter and the depthwise filter it feeds count as two)."""
        return sum(len(c) for c in self.removed_by_layer().values())

    def structure(self) -> dict:
        """The pruned shapes as plain data: output channels removed per conv ("out"), inputs removed per consumer
        ("in"), channels removed per BN ("bn"), consumers that gained a bias ("bias_added")."""
        bns: dict[str, set[int]] = {}
        ins: dict[str, set[int]] = {}
        for g in self.groups:
            for r in g.removals:
                if r.bn is not None:
                    bns.setdefault(r.bn, set()).update(r.channels)
            for c in g.compensations:
                ins.setdefault(c.module, set()).update(c.inputs)
        added = sorted({c.module for g in self.groups for c in g.compensations if c.target == "new_bias"})
        return {"out": {k: sorted(v) for k, v in self.removed_by_layer().items()},
                "in": {k: sorted(v) for k, v in ins.items()},
                "bn": {k: sorted(v) for k, v in bns.items()}, "bias_added": added}

    def as_dict(self) -> dict:
        return asdict(self) | {"filters_removed": self.filters_removed}


class _Unsupported(Exception):
    """The constant reaches something removal cannot follow: the filter is neutralized instead."""


class _Shared(_Unsupported):
    """A module on the path is called at two places: changing it would change both; left alone."""


def _pads_average(mod, node: fx.Node) -> bool:
    """An average pool whose zero padding dilutes a constant at the borders."""
    if isinstance(mod, nn.AvgPool2d):
        return bool(mod.padding)
    if node.op == "call_function" and node.target is F.avg_pool2d:
        pad = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
        return bool(pad)
    return False


def _padded(conv: nn.Conv2d) -> bool:
    """Does zero padding touch this conv's input? A Conv2d subclass may pad inside its forward: assume it does,
    unless it pads through a ``static_padding`` module that is an identity ("same" padding of a 1×1 conv)."""
    if type(conv) is not nn.Conv2d:
        pad = getattr(conv, "static_padding", None)
        if isinstance(pad, nn.Identity) or type(pad).__name__ == "Identity":  # libraries ship their own Identity
            return False
        if isinstance(pad, nn.ZeroPad2d):
            return any(p > 0 for p in pad.padding)
        return True
    pad = conv.padding
    return pad == "same" or (not isinstance(pad, str) and any(p > 0 for p in pad))


class _Walker:
    """Follows removed channels from a producer to every consumer, collecting removals and compensations."""

    def __init__(self, gm: fx.GraphModule, ctx: "_Context"):
        self.gm, self.ctx, self.shared = gm, ctx, ctx.shared
        self.removals: list[Removal] = []
        self.compensations: list[Compensation] = []
        self.inexact: list[str] = []  # where a non-zero constant meets zero padding (the output would change there)
        self.adds: list[fx.Node] = []  # adds crossed: each is walked on from once

    @property
    def exact(self) -> bool:
        return not self.inexact

    def _check_shared(self, *names: str | None) -> None:
        for name in names:
            if name is not None and name in self.shared:
                raise _Shared(f"module {name!r} is called at more than one place in the graph")

    def walk(self, node: fx.Node, index: dict[int, list[int]], values: dict[int, float],
             exclude: fx.Node | None = None) -> None:
        """``index[c]``: tensor positions of producer channel c at ``node``; ``values[c]``: its constant there.
        ``exclude``: a user already accounted for (the add a member was reached from)."""
        for user in node.users:
            mod = module_of(self.gm, user)
            if _is_shape_query(user) or user is exclude:
                continue  # x.size(0) / x.shape[0] read the batch size, not the channels' values
            if user.op == "output":
                raise _Unsupported("its output is a model output")
            if isinstance(mod, nn.Conv2d):
                self._check_shared(user.target)
                if mod.groups == 1:
                    self._dense(user, node, mod, index, values)
                elif is_depthwise(mod):
                    self._depthwise(user, mod, index, values)
                else:
                    raise _Unsupported(f"it feeds grouped conv {user.target!r} (groups={mod.groups})")
            elif isinstance(mod, nn.Linear):
                self._check_shared(user.target)
                self._dense(user, node, mod, index, values)
            elif is_passthrough(self.gm, user):
                if _pads_average(mod, user) and any(v != 0 for v in values.values()):
                    self.inexact.append(f"the zero-padded average pool {_name(user)!r}")
                self.walk(user, index, values)
            elif is_spatial_mean(user):
                self.walk(user, index, values)
            elif (act := activation_of(self.gm, user)) is not None:
                self.walk(user, index, {c: _apply(act, v) for c, v in values.items()})
            elif _is_cat(user):
                self.walk(user, _cat_positions(user, node, index), values)
            elif _is_add(user):
                self._add(user, node, index, values)
            elif is_flatten(self.gm, user):
                hw = spatial_size(node)
                self.walk(user, {c: [i * hw + k for i in pos for k in range(hw)] for c, pos in index.items()}, values)
            else:
                what = user.target if user.op == "call_module" else getattr(user.target, "__name__", user.target)
                raise _Unsupported(f"it feeds {what!r} ({user.op}), which this version does not prune through")

    def _dense(self, node: fx.Node, src: fx.Node, mod: nn.Module, index, values) -> None:
        if not node.args or node.args[0] is not src:
            raise _Unsupported(f"{node.target!r} uses the channel other than as its input")
        inputs = [i for c in index for i in index[c]]
        vals = [values[c] for c in index for _ in index[c]]
        if any(v != 0 for v in vals) and isinstance(mod, nn.Conv2d) and _padded(mod):
            self.inexact.append(f"the zero-padded conv {node.target!r}")
        if mod.bias is not None:
            target, bn = "bias", None
        else:
            chain = chain_from_conv(self.gm, node) if isinstance(mod, nn.Conv2d) else None
            bn = chain.bn if chain is not None else None
            self._check_shared(bn)
            target = "bn_mean" if bn is not None else "new_bias"
        self.compensations.append(Compensation(node.target, inputs, vals, target, bn))

    def _add(self, add: fx.Node, src: fx.Node, index, values) -> None:
        """The sum is constant on these channels only if every other member is: then each member's filter goes
        too (``_member``) and the sum is walked on; otherwise _Unsupported (the filter is neutralized)."""
        if add in self.adds:
            return  # reached again through another member: its sum was walked on already
        if any(len(p) != 1 for p in index.values()):
            raise _Unsupported(f"it reaches add {add.name!r} after a flatten or a duplicated concat")
        self.adds.append(add)
        sums = dict(values)
        others = list(add.args)
        others.remove(src)  # x + x: the second x is a member like any other
        for other in others:
            for c, v in self._member(other, index, add).items():
                sums[c] += v
        self.walk(add, index, sums)

    def _member(self, node: fx.Node, index, via: fx.Node) -> dict[int, float]:
        """Constant values on ``index``'s channels of ``node``, a member of add ``via``: a conv → BN chain's output
        whose filters there are constant (removed here), an activation of such a value, or another add of them. Its
        other readers are walked (they lose the channel). Raises _Unsupported otherwise."""
        chain = self.ctx.chains.get(node)
        channels = {c: p for c, (p,) in index.items()}
        if chain is not None and chain.bn is not None:
            self._check_shared(chain.conv, chain.bn)
            conv, bn = self.gm.get_submodule(chain.conv), self.gm.get_submodule(chain.bn)
            if conv.groups > 1:
                raise _Unsupported(f"add {via.name!r} has a member from the grouped conv {chain.conv!r}")
            mask = constant_mask(bn, self.ctx.tol, self.ctx.rule, chain.act_fn, self.ctx.act_bits)
            if not all(bool(mask[p]) for p in channels.values()):
                raise _Unsupported(f"it reaches add {via.name!r}, whose member {chain.conv!r} is not constant there")
            values = _chain_constants(bn, chain, channels)
            self.removals.append(Removal(chain.conv, chain.bn, sorted(set(channels.values()))))
        elif _is_add(node) and node not in self.adds:
            self.adds.append(node)
            values = {c: 0.0 for c in channels}
            for member in node.args:
                for c, v in self._member(member, index, node).items():
                    values[c] += v
        elif node.op != "placeholder" and (act := activation_of(self.gm, node)) is not None and node.args:
            values = {c: _apply(act, v) for c, v in self._member(node.args[0], index, node).items()}
        else:
            raise _Unsupported(f"it reaches add {via.name!r}, whose member {_name(node)!r} is not a constant filter")
        self.walk(node, index, values, exclude=via)
        return values

    def _depthwise(self, node: fx.Node, mod: nn.Conv2d, index, values) -> None:
        chain = chain_from_conv(self.gm, node)
        self._check_shared(chain.bn)  # activations are stateless: one module called twice is harmless
        channels = [i for c in index for i in index[c]]
        if len(channels) != len(index):
            raise _Unsupported(f"depthwise conv {node.target!r} after a flatten")
        if any(v != 0 for v in values.values()) and _padded(mod):
            # at the borders the depthwise output is not constant: it cannot be removed and carried on
            self.inexact.append(f"the zero-padded depthwise conv {node.target!r}")
        new_values = {}
        for c, (ch,) in index.items():
            v = values[c] * float(mod.weight[ch].detach().sum())
            if mod.bias is not None:
                v += float(mod.bias[ch])
            if chain.bn is not None:
                bn = self.gm.get_submodule(chain.bn)
                v = _bn_value(bn, ch, v)
            new_values[c] = _apply(chain.act_fn, v) if chain.act_fn is not None else v
        self.removals.append(Removal(chain.conv, chain.bn, channels, depthwise=True))
        self.walk(chain.out, index, new_values)


def _name(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))


def _is_shape_query(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("size", "dim")) or \
        (node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr" and "shape" in node.args)


def _is_add(node: fx.Node) -> bool:
    """An element-wise add of two computed tensors of the same shape (a residual join), not a bias or scalar add."""
    if node.op != "call_function" or node.target not in (operator.add, torch.add) or len(node.args) != 2:
        return False
    if node.kwargs.get("alpha", 1) != 1 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    shapes = [a.meta.get("tensor_meta") for a in (*node.args, node)]
    return all(m is not None for m in shapes) and len({tuple(m.shape) for m in shapes}) == 1


def _is_cat(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim in (1, -3)


def _cat_positions(cat: fx.Node, src: fx.Node, index: dict[int, list[int]]) -> dict[int, list[int]]:
    """Positions of ``src``'s channels in the concatenation (every copy if ``src`` appears more than once)."""
    offsets, offset = [], 0
    for t in cat.args[0]:
        if t is src:
            offsets.append(offset)
        offset += int(t.meta["tensor_meta"].shape[1])
    return {c: [o + p for o in offsets for p in pos] for c, pos in index.items()}


def _apply(act: nn.Module, v: float) -> float:
    with torch.no_grad():
        return float(act(torch.tensor([v], dtype=torch.float32))[0])


def _chain_constants(bn: nn.BatchNorm2d, chain: Chain, channels: dict[int, int]) -> dict[int, float]:
    """{key: a} for each constant filter ``channels[key]`` of ``chain``: its BN's β, through the chain's activation."""
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros(bn.num_features)
    values = {c: float(beta[p]) for c, p in channels.items()}
    return {c: _apply(chain.act_fn, v) for c, v in values.items()} if chain.act_fn is not None else values


def _bn_value(bn: nn.BatchNorm2d, c: int, x: float) -> float:
    gamma = float(bn.weight[c]) if bn.weight is not None else 1.0
    beta = float(bn.bias[c]) if bn.bias is not None else 0.0
    return gamma * (x - float(bn.running_mean[c])) / float(bn.running_var[c] + bn.eps) ** 0.5 + beta


PADDED = ("neutralize", "remove")  # what rule "exact" does with a constant that meets zero padding


def plan_pfq(gm: fx.GraphModule, tol: float = DEFAULT_TOL, rule: str = "exact",
             padded: str = "neutralize", act_bits: int | None = None, channel_multiple: int = 1) -> PrunePlan:
    """Find the constant filters of every conv → BN chain in ``gm`` (traced by ``graph.trace``) and plan removal.

    Returns a PrunePlan; modifies nothing. rule "exact" is design.md §2's (post-BN std ≤ ``tol``); "bn-epsilon"
    also takes σ² ≤ ε filters, replaced by their mean β — every group is then marked not exact. ``padded``: under
    rule "exact", a filter whose non-zero constant meets zero padding is "neutralize"d (the function kept exactly)
    or "remove"d (exact in the interior only; the group is marked not exact and the borders differ).
    rule "near-constant" takes the filters that cannot move their quantized activation by a step at ``act_bits``
    (criterion.py), replaced by act(β) — approximate like "bn-epsilon", but its constants that meet zero padding are
    neutralized as under "exact" (a border error is the size of the constant, not below a step); ValueError
    without ``act_bits``.
    Channels already removed through an earlier chain (a depthwise conv behind a constant filter) are not
    counted twice. ``channel_multiple`` > 1 (hardware-aware PfQ, ``align_channels``): every layer that loses
    channels keeps a count that is a multiple of gcd(its count, ``channel_multiple``); the constant filters that
    would break it are neutralized instead of removed.
    """
    if rule not in RULES:
        raise ValueError(f"unknown PfQ rule {rule!r}; known: {', '.join(RULES)}")
    if padded not in PADDED:
        raise ValueError(f"unknown padded policy {padded!r}; known: {', '.join(PADDED)}")
    if rule == "near-constant" and act_bits is None:
        raise ValueError("PfQ rule near-constant needs the activation bit width")
    if channel_multiple < 1:
        raise ValueError(f"channel_multiple must be ≥ 1, got {channel_multiple}")
    with torch.no_grad():
        ctx = _context(gm, tol, rule, act_bits)
        plan = _plan(gm, ctx, padded)
        if channel_multiple > 1:
            align_channels(gm, plan, ctx, channel_multiple)
        _neutralize_followers(gm, plan, ctx)
    if rule != "exact":
        for g in plan.groups:
            g.exact = False
    return plan


@dataclass
class _Context:
    """What every group's walk needs: modules called at two places, the criterion, chains by output node."""

    shared: set[str]
    tol: float
    rule: str
    chains: dict
    act_bits: int | None = None


def _context(gm: fx.GraphModule, tol: float, rule: str, act_bits: int | None) -> _Context:
    shared = {name for name, n in call_counts(gm).items() if n > 1}
    return _Context(shared, tol, rule, {c.out: c for c in conv_chains(gm)}, act_bits)


def _plan(gm: fx.GraphModule, ctx: _Context, padded: str) -> PrunePlan:
    plan = PrunePlan(tol=ctx.tol, rule=ctx.rule)
    tol, rule, act_bits, shared = ctx.tol, ctx.rule, ctx.act_bits, ctx.shared
    removed: dict[str, set[int]] = {}  # channels already deleted through an earlier group
    for chain in ctx.chains.values():
        if chain.bn is None:
            continue
        bn = gm.get_submodule(chain.bn)
        mask = constant_mask(bn, tol, rule, chain.act_fn, act_bits)
        all_constant = bool(mask.all())
        if all_constant:
            plan.warnings.append(f"all {mask.numel()} filters of {chain.conv!r} are constant: everything downstream "
                                 f"of it is constant; one filter is kept so that no layer has 0 channels")
            mask[0] = False
        channels = [int(i) for i in torch.nonzero(mask).flatten() if int(i) not in removed.get(chain.conv, set())]
        if not channels:
            if all_constant and mask.numel() == 1:
                plan.skipped.append(Skipped(chain.conv, 1, "its only filter is constant; a layer keeps ≥ 1 channel"))
            continue
        try:
            group = _plan_group(gm, chain, bn, channels, ctx)
            if rule != "bn-epsilon" and padded == "neutralize" and not group.exact:
                group = _keep_exact(gm, chain, bn, group, ctx, plan)
                if group is None:
                    continue
        except _Shared as exc:
            plan.skipped.append(Skipped(chain.conv, len(channels), f"left unchanged: {exc}"))
            continue
        except _Unsupported as exc:
            if chain.conv in shared or chain.bn in shared:
                plan.skipped.append(Skipped(chain.conv, len(channels), f"left unchanged: {exc}; shared module"))
            else:
                plan.neutralized.append(Neutralized(chain.conv, chain.bn, channels, f"kept for shape: {exc}"))
            continue
        emptied = [r.conv for r in group.removals
                   if len(removed.get(r.conv, set()) | set(r.channels)) >= gm.get_submodule(r.conv).out_channels]
        if emptied:  # never a layer with 0 channels: keep these filters, neutralized
            plan.neutralized.append(Neutralized(chain.conv, chain.bn, channels,
                                                f"kept: removing them would leave {emptied[0]!r} with 0 channels",
                                                why="last channel"))
            continue
        plan.groups.append(group)
        for r in group.removals:
            removed.setdefault(r.conv, set()).update(r.channels)
    return plan


FOLDING_REASON = "kept for folding"


def align_channels(gm: fx.GraphModule, plan: PrunePlan, ctx: _Context, multiple: int) -> None:
    """Hardware-aware PfQ: neutralize instead of remove the constant filters whose removal would leave a layer with
    a channel count that is not a multiple of g = gcd(its count, ``multiple``); modifies ``plan`` in place.

    Why: a dataflow accelerator folds each layer by divisors of its channel counts (FINN: an MVAU's SIMD divides its
    input channels and is capped by the weight-stream width, its PE divides its output channels, a VVAU's PE its
    channels). 64 → 57 channels leaves the divisors 1, 3, 19, 57, so a throughput target forces a far more parallel,
    larger layer; 64 → 56 keeps 1, 2, 4, 8 and every fold 64/PE ≤ 8 of the original, so the pruned layer needs at
    most the original parallelism. Neutralized filters keep the range gain (their folded weights are 0); only the
    MACs saving of removing them is given up. Each step takes back the most recently planned filter that touches a
    misaligned layer (a group through an add last: its channel is then neutralized in every member of the add),
    so it ends; at worst nothing is removed.
    """
    plan.channel_multiple = multiple
    chains = {c.conv: c for c in ctx.chains.values()}
    while True:
        removed = plan.removed_by_layer()
        misaligned = {}
        for conv, channels in removed.items():
            count = gm.get_submodule(conv).out_channels
            g = math.gcd(count, multiple)
            if (count - len(channels)) % g:
                misaligned[conv] = (g, count - len(channels))
        if not misaligned:
            return
        touching = [(i, grp) for i, grp in reversed(list(enumerate(plan.groups)))
                    if any(r.conv in misaligned for r in grp.removals)]
        # a group through an add last: taking one of its channels back neutralizes a filter in every member
        candidate = next(((i, grp) for i, grp in touching if not grp.adds), None) or next(iter(touching), None)
        if candidate is None:
            plan.warnings.append(f"channel counts of {', '.join(sorted(misaligned))} are not multiples of "
                                 f"{multiple}, and no planned removal touches them")
            return
        index, group = candidate
        chain = chains[group.producer]
        c = group.channels[-1]
        layers = sorted({r.conv for r in group.removals if r.conv in misaligned})
        g, count = misaligned[layers[0]]
        reason = (f"{FOLDING_REASON}, neutralized: removing them would leave {layers[0]!r} with {count} channels, "
                  f"not a multiple of {g} (channel_multiple {multiple})")
        if group.adds:  # the channel stays in the sum, so each member's filter on it stays too, neutralized
            single = _plan_group(gm, chain, gm.get_submodule(chain.bn), [c], ctx)
            for r in single.removals:
                if r.bn is not None and not r.depthwise and r.conv in chains:
                    for member_channel in r.channels:
                        _neutralize(plan, chains[r.conv], member_channel, reason)
        else:
            _neutralize(plan, chain, c, reason)
        rest = group.channels[:-1]
        if rest:
            plan.groups[index] = _plan_group(gm, chain, gm.get_submodule(chain.bn), rest, ctx)
        else:
            del plan.groups[index]


def _neutralize_followers(gm: fx.GraphModule, plan: PrunePlan, ctx: _Context) -> None:
    """Neutralize the constant filters that a kept producer leaves behind, in place.

    A depthwise filter fed by a constant filter is planned as part of its producer's group (removed with it) and
    so is not a group of its own. When that producer stays instead — neutralized at zero padding, for the channel
    multiple, for shapes — the follower would keep its own weights, and with them the folded range PfQ is there to
    fix (measured: rule near-constant at W3 on the default model left a depthwise layer at 22.3 instead of 4.5,
    PTQ 10 %). Every filter that is constant by the rule and neither removed, neutralized nor left unchanged on
    purpose (shared modules) is therefore neutralized here: output β as the rule says, range no longer set by it.
    """
    removed = plan.removed_by_layer()
    handled: dict[str, set[int]] = {}
    for n in plan.neutralized:
        handled.setdefault(n.conv, set()).update(n.channels)
    skipped = {s.layer for s in plan.skipped}
    for chain in ctx.chains.values():
        if chain.bn is None or chain.conv in skipped or chain.conv in ctx.shared or chain.bn in ctx.shared:
            continue
        mask = constant_mask(gm.get_submodule(chain.bn), ctx.tol, ctx.rule, chain.act_fn, ctx.act_bits)
        if bool(mask.all()):
            mask[0] = False  # as in _plan: a layer keeps one channel
        left = [int(i) for i in torch.nonzero(mask).flatten()
                if int(i) not in removed.get(chain.conv, set()) | handled.get(chain.conv, set())]
        if left:
            plan.neutralized.append(Neutralized(
                chain.conv, chain.bn, left, "constant behind a filter that stays: its producer's filter is kept "
                "(neutralized), so this one is not removed with it; neutralized too", why="behind a kept filter"))


def _neutralize(plan: PrunePlan, chain: Chain, channel: int, reason: str) -> None:
    for n in plan.neutralized:  # one entry per layer; its reason names the count that removing them all would leave
        if n.conv == chain.conv and n.reason.startswith(FOLDING_REASON):
            n.channels = sorted(n.channels + [channel])
            return
    plan.neutralized.append(Neutralized(chain.conv, chain.bn, [channel], reason, why="folding"))


def _keep_exact(gm, chain: Chain, bn: nn.BatchNorm2d, group: PruneGroup, ctx: _Context,
                plan: PrunePlan) -> PruneGroup | None:
    """Rule "exact" keeps the function: the filters of ``group`` whose constant meets zero padding (there the
    consumer sees 0, not the constant, so removal would change the borders) are neutralized instead — output β kept
    exactly, folded range no longer set by them; the others are planned again as a group. Returns it, or None if no
    filter is left to remove."""
    per_filter = {c: _plan_group(gm, chain, bn, [c], ctx) for c in group.channels}
    padded = [c for c, g in per_filter.items() if not g.exact]
    where = per_filter[padded[0]].inexact[0]
    plan.neutralized.append(Neutralized(chain.conv, chain.bn, padded,
                                        f"exact: its constant meets zero padding in {where}; removing it would change "
                                        f"the output at the borders", why="zero padding"))
    rest = [c for c in group.channels if c not in padded]
    return _plan_group(gm, chain, bn, rest, ctx) if rest else None


def _plan_group(gm, chain: Chain, bn: nn.BatchNorm2d, channels: list[int], ctx: _Context) -> PruneGroup:
    walker = _Walker(gm, ctx)
    walker._check_shared(chain.conv, chain.bn)
    values = _chain_constants(bn, chain, {c: c for c in channels})
    conv = gm.get_submodule(chain.conv)
    if conv.groups > 1 and not is_depthwise(conv):
        raise _Unsupported(f"{chain.conv!r} is a grouped conv: removing a filter would unbalance its groups")
    if is_depthwise(conv):
        # A depthwise filter reads only its own input channel: that channel's producer filter becomes unused.
        walker.removals.append(_unused_upstream(gm, chain, channels, ctx.shared))
    walker.removals.append(Removal(chain.conv, chain.bn, channels, depthwise=is_depthwise(conv)))
    walker.walk(chain.out, {c: [c] for c in channels}, values)
    return PruneGroup(chain.conv, channels, [values[c] for c in channels], walker.removals, walker.compensations,
                      walker.exact, list(dict.fromkeys(walker.inexact)), [a.name for a in walker.adds])


def _unused_upstream(gm, chain: Chain, channels: list[int], shared: set[str]) -> Removal:
    """The filters that fed only the removed depthwise channels: removed with them (no compensation needed)."""
    src = chain.conv_node.args[0]
    for node in gm.graph.nodes:
        mod = module_of(gm, node)
        if isinstance(mod, nn.Conv2d) and node is not chain.conv_node:
            up = chain_from_conv(gm, node)
            if up.out is src:
                if len(src.users) != 1 or up.conv in shared or (up.bn in shared):
                    break
                if mod.groups > 1:
                    raise _Unsupported("its input comes from a depthwise or grouped conv")
                return Removal(up.conv, up.bn, channels)
    raise _Unsupported("removing a depthwise filter needs its input channel's producer to feed only this conv")
