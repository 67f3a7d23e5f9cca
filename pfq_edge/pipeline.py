"""``pfq-edge compile``: the steps of a target, run over one Compilation, written atomically.

    steps_for(profile) = FRONT_END + backend.steps + [PACKAGE]
        front end  load → prune (PfQ) → quantize → finetune       pfq_edge/steps.py
        fpga       export (QONNX) → estimate (FINN)               targets/backends/finn/
        cpu, gpu   export (QCDQ) → build (TVM) → measure          targets/backends/tvm/
        every one  package                                        pfq_edge/steps.py

Output is built in a staging folder and moved into place only when every step (and every golden check) has
passed. ``--to-step`` stops after a step, ``--from-step`` resumes from the ``steps/`` an earlier run left
(pfq_edge/resume.py).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from pfq_edge import interrupt
from pfq_edge.compilation import FRONT_END_SECTIONS, Compilation, CompileConfig, front_end_settings
from pfq_edge.errors import PfqError, ProfileError
from pfq_edge.resume import STATE_DIR, resume, save_state
from pfq_edge.steps import FRONT_END, PACKAGE, Step

__all__ = ["CompileConfig", "compile_model", "compile_targets", "steps_for", "run_steps", "budget_missed"]


def steps_for(profile) -> list[Step]:
    """Every step of a compile for ``profile``, in order."""
    from pfq_edge.targets.backends import backend_for

    return FRONT_END + backend_for(profile.kind).steps + [PACKAGE]


def run_steps(c: Compilation, steps: list[Step], state: Path | None = None) -> Compilation:
    """Run ``steps`` in order on ``c``, storing each result in ``c.results`` and its wall time in ``c.timings_s``;
    with ``state``, the step state (pfq_edge/resume.py) is saved there after every step."""
    plan = steps_for(c.profile) if state is not None else []
    for step in steps:
        c.say(f"step {step.name} …")
        t0 = time.perf_counter()
        try:
            result = step.run(c)
        except PfqError:
            interrupt.check()  # a tool that caught Ctrl-C reports a failure: it is the interruption
            raise
        interrupt.check()  # ... or carries on as if nothing happened
        c.results[step.name] = result
        c.timings_s[step.name] = round(time.perf_counter() - t0, 2)
        if state is not None:
            if step.save is not None:
                state.mkdir(exist_ok=True)
                step.save(c, state)
            save_state(c, plan, state)
    return c


def effective_profile(cfg: CompileConfig):
    """The profile named by ``cfg.target`` with ``cfg.overrides`` applied; raises ProfileError."""
    from pfq_edge.targets.profile import load_profile, with_overrides

    return with_overrides(load_profile(cfg.target), cfg.overrides)


def effective_profiles(cfg: CompileConfig, targets: list[str]) -> list:
    """The profile of each target with ``cfg.overrides`` applied. With several targets, target-specific options
    (e.g. --tune-trials, --no-compare-unpruned) apply to the targets that run on this machine and have their
    section, and are ignored for the others.
    Raises ProfileError (also for a target named twice)."""
    import dataclasses

    from pfq_edge.targets.backends import backend_for
    from pfq_edge.targets.profile import load_profile

    profiles = []
    for t in targets:
        one = dataclasses.replace(cfg, target=t)
        base = load_profile(t)
        if len(targets) > 1 and not backend_for(base.kind).runs_here(base):
            one = dataclasses.replace(one, overrides={k: v for k, v in cfg.overrides.items()
                                                      if k in FRONT_END_SECTIONS})
        elif len(targets) > 1:  # an FPGA-only option (--no-compare-unpruned) is not an error for the CPU target
            one = dataclasses.replace(one, overrides={k: v for k, v in cfg.overrides.items()
                                                      if k in FRONT_END_SECTIONS or getattr(base, k, None)})
        profiles.append(effective_profile(one))
    names = [p.name for p in profiles]
    if len(set(names)) < len(names):
        raise ProfileError(f"target {next(n for n in names if names.count(n) > 1)!r} is named twice")
    return profiles


def check_targets(cfg: CompileConfig, profiles: list) -> None:
    """Before any work: options, step names and each target's tools. Raises PfqError subclasses."""
    from pfq_edge.targets.backends import backend_for

    cfg.check()
    for profile in profiles:
        backend = backend_for(profile.kind)
        backend.check_config(profile, cfg, several=len(profiles) > 1)
        backend.check_tools(profile)
    check_step_names(cfg, profiles)


def check_step_names(cfg: CompileConfig, profiles: list) -> None:
    """--to-step / --from-step: known steps of the one target, in order, and a folder to resume from."""
    if cfg.to_step is None and cfg.from_step is None:
        return
    if len(profiles) > 1:
        raise PfqError(f"--to-step and --from-step apply to one target; {len(profiles)} targets given")
    names = [s.name for s in steps_for(profiles[0])]
    for option, name in (("--to-step", cfg.to_step), ("--from-step", cfg.from_step)):
        if name is not None and name not in names:
            raise PfqError(f"{option} {name!r} is not a step of {profiles[0].name!r}; its steps: {', '.join(names)}")
    if cfg.to_step and cfg.from_step and names.index(cfg.to_step) < names.index(cfg.from_step):
        raise PfqError(f"--to-step {cfg.to_step!r} comes before --from-step {cfg.from_step!r}")
    if cfg.from_step and not (Path(cfg.out) / STATE_DIR).is_dir():
        raise PfqError(f"--from-step {cfg.from_step}: {cfg.out} holds no {STATE_DIR}/ to resume from (run "
                       f"`pfq-edge compile` with this --out first)")


def compile_model(cfg: CompileConfig, log=None) -> Compilation:
    """Run every step for ``cfg``; the output folder ``cfg.out`` appears only when all of them succeed.

    Raises PfqError subclasses (ProfileError, DataError, ModelError, GoldenCheckError, ToolchainError, OutputError)
    with one-line messages; nothing is left in ``cfg.out`` on failure.
    Under ``torchrun`` every process fine-tunes its share; only rank 0 exports, estimates and writes ``cfg.out``.
    """
    return compile_targets(cfg, [cfg.target], log)[0]


def compile_targets(cfg: CompileConfig, targets: list[str], log=None) -> list[Compilation]:
    """Compile ``cfg.model`` for every target in ``targets``, fine-tuning once per distinct front-end setting. One
    target writes its output into ``cfg.out``; several write ``cfg.out``/<profile name>/ each plus
    ``summary.json``, ``summary.md`` and ``accuracy_size.png`` across targets. All of it appears only when every
    target succeeds (one staged folder). Returns the compilations in ``targets`` order; raises PfqError."""
    import tempfile

    from pfq_edge import dist
    from pfq_edge.export.outputs import write_run_facts
    from pfq_edge.io import staged_dir

    profiles = effective_profiles(cfg, targets)
    check_targets(cfg, profiles)
    groups: dict[str, list[int]] = {}
    for i, profile in enumerate(profiles):
        groups.setdefault(json.dumps(front_end_settings(profile), sort_keys=True), []).append(i)
    if cfg.checkpoint is not None and len(groups) > 1:
        raise ProfileError(f"--checkpoint holds one fine-tuning run; these targets need {len(groups)} (different "
                           f"quant/pfq/finetune settings): compile them separately")
    rank, world = dist.init_from_env()
    if world > 1 and (cfg.to_step or cfg.from_step):
        raise PfqError("--to-step and --from-step run in one process, not under torchrun")
    out = Path(cfg.out)
    done: list[Compilation | None] = [None] * len(profiles)
    try:
        with (staged_dir(out, force=cfg.force or cfg.from_step is not None) if rank == 0 else
              tempfile.TemporaryDirectory(prefix="pfq-edge-rank")) as work:
            work = Path(work)
            if len(profiles) == 1:
                done[0] = _compile_one(cfg, profiles[0], work, rank, log)
                if rank == 0:
                    write_run_facts(work / "run.json", done[0].timings_s)
            else:
                for members in groups.values():
                    for i, c in zip(members, _compile_group(cfg, [profiles[i] for i in members], work, rank, log)):
                        done[i] = c
                if rank == 0:
                    _write_multi(work, cfg.model, done)
    finally:
        dist.barrier()  # the other ranks pass it once rank 0's output is in place
    return done


def _compile_one(cfg: CompileConfig, profile, work: Path, rank: int, log) -> Compilation:
    """One target into ``work``: all its steps (or from ``cfg.from_step`` to ``cfg.to_step``), state saved."""
    from pfq_edge.train import set_seed

    c = Compilation(config=cfg, profile=profile, work=work, final=Path(cfg.out), log=log)
    plan = steps_for(profile)
    todo = resume(c, plan, cfg.from_step, Path(cfg.out)) if cfg.from_step else plan
    if cfg.to_step:
        todo = todo[:[s.name for s in todo].index(cfg.to_step) + 1]
    set_seed(profile.finetune.seed)
    if rank != 0:
        return run_steps(c, [s for s in todo if s in FRONT_END])
    return run_steps(c, todo, state=work / STATE_DIR)


def _compile_group(cfg: CompileConfig, profiles: list, work: Path, rank: int, log) -> list[Compilation]:
    """Targets that share one front end: it runs once; each target then runs its own steps in work/<name>.
    Returns their compilations (on a rank other than 0: the front end's alone)."""
    from pfq_edge.export.outputs import write_run_facts
    from pfq_edge.train import set_seed

    set_seed(profiles[0].finetune.seed)
    base = run_steps(Compilation(config=cfg, profile=profiles[0], work=work, final=Path(cfg.out), log=log),
                     FRONT_END)
    if rank != 0:
        return [base]
    done = []
    for profile in profiles:
        folder = work / profile.name
        folder.mkdir(exist_ok=True)
        c = Compilation(config=cfg, profile=profile, work=folder, final=Path(cfg.out) / profile.name, log=log,
                        spec=base.spec, data=base.data, float_model=base.float_model,
                        pruned_model=base.pruned_model, float_logits=base.float_logits,
                        qmodel=copy.deepcopy(base.qmodel) if len(profiles) > 1 else base.qmodel,
                        results=dict(base.results), timings_s=dict(base.timings_s))
        done.append(run_steps(c, steps_for(profile)[len(FRONT_END):]))
        write_run_facts(folder / "run.json", c.timings_s)
    return done


def _write_multi(work: Path, model: str, done: list[Compilation]) -> None:
    from pfq_edge.export.outputs import write_summary
    from pfq_edge.report import summary

    rows = [{"target": c.profile.name, "kind": c.profile.kind, "folder": c.profile.name,
             "archive": f"{c.profile.name}/{c.result('package').archive}", **summary(c)} for c in done]
    write_summary(work, model, rows)


def budget_missed(c: Compilation) -> str | None:
    """A one-line reason if a finished compile misses its profile's budget (fit or latency), else None."""
    from pfq_edge.report import summary
    from pfq_edge.targets.backends import backend_for

    if "package" not in c.results:
        return None  # stopped early (--to-step): nothing to judge yet
    return backend_for(c.profile.kind).budget_missed(summary(c))
