"""PfQ — Pruning for Quantization (Nishikawa & Ikegaya, arXiv:2011.06751), as read in shared/design.md §2–4.

Four parts, apart as in Torch-Pruning (structure, criterion and mutation do not know each other's insides):

    graph.py      structure: the model as a torch.fx graph, conv → BN → activation chains, channel flow
    criterion.py  which filters are constant (a rule over BN statistics), folded-weight range statistics
    plan.py       what removal does: removals, compensations, neutralized / left filters (modifies nothing)
    apply.py      the mutation: compensate, neutralize, slice channels (or rebuild saved pruned shapes)
    analyze.py    plan + apply on a copy, with the per-layer accounting the CLI and the report show

A new rule: add its name to RULES below and its mask to ``criterion.constant_mask``; the profile schema, the CLI
and the plan take the names from here.
"""

DEFAULT_TOL = 1e-6  # post-BN std (output units) at or below which a filter counts as constant; far below any step
RULES = ("exact", "bn-epsilon", "near-constant")  # rules that remove filters
RULE_OFF = "off"                 # no PfQ: the plain-QAT baseline
PROFILE_RULES = RULES + (RULE_OFF,)
# what each approximate rule replaces, as the CLI and report.md state it (the other rules keep the function)
REPLACES = {"bn-epsilon": "σ² ≤ ε filters replaced by their mean β",
            "near-constant": "filters whose BN output band is under half an activation step replaced by act(β)"}
