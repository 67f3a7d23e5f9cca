"""The shape of the code that issue 14 asks for, checked on the source: target-kind knowledge only in backends,
every profile kind registered, every step named once, golden checks declared in the one tolerance table."""

import re
from pathlib import Path

from pfq_edge.golden import TOLERANCES
from pfq_edge.pipeline import steps_for
from pfq_edge.targets.backends import backend_for, kinds
from pfq_edge.targets.profile import builtin_profiles

ROOT = Path(__file__).resolve().parents[1]
# what branching on the target kind looks like: comparing a kind, or reaching into one kind's profile section
KIND_BRANCH = re.compile(r"""kind\s*[!=]=\s*["'](fpga|cpu|gpu)["']|profile\.(fpga|runtime)\b|"(estimate|build|measure)" in""")


def test_no_module_outside_the_backends_branches_on_the_target_kind():
    offenders = []
    for folder in ("pfq_edge", "export", "targets"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("targets/backends/") or rel in ("targets/profile.py", "export/device/run.py"):
                continue  # the backends themselves; the schema of the sections; the runner shipped to the device
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if KIND_BRANCH.search(line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == []


def test_every_profile_kind_has_a_backend_whose_steps_are_complete():
    for profile in builtin_profiles().values():
        assert profile.kind in kinds()
        names = [s.name for s in steps_for(profile)]
        assert names[:4] == ["load", "prune", "quantize", "finetune"] and names[4] == "export"
        assert names[-1] == "package" and len(set(names)) == len(names)
        for step in steps_for(profile):
            assert set(step.golden) <= set(TOLERANCES), step.name
            assert all(r in names[:names.index(step.name)] for r in step.requires), step.name
            assert step.summary, step.name
    assert backend_for("cpu") is backend_for("gpu")


def test_no_backend_submodule_shadows_a_step_function():
    # importing submodule X of a package binds X on the package: a step function named X would be replaced by the
    # module once the first compile imported it (seen: a second TVM target's "build" step called the module)
    for kind in kinds():
        backend = backend_for(kind)
        folder = ROOT / "targets" / "backends" / backend.name
        submodules = {p.stem for p in folder.glob("*.py")}
        assert not submodules & {s.run.__name__ for s in backend.steps}, kind
