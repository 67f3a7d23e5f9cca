"""Target backends: everything one kind of target knows, one folder each, registered by the profile's ``kind``.

    finn/   kind "fpga":        QONNX export → FINN estimate-only dataflow build, fit and latency verdicts
    tvm/    kinds "cpu", "gpu": QCDQ export → TVM (Relax) library, reloaded and checked, latency measured

Every compile runs the shared front end (pfq_edge/steps.py: load → prune → quantize → finetune), then its
backend's ``steps``, then package. Nothing outside a backend and this registry branches on the target kind: the
pipeline, the report, the manifest, the device README and the CLI ask the backend.

Adding a target kind (say hls4ml or TFLite-Micro)
-------------------------------------------------
1. A backend module ``targets/backends/<name>/__init__.py`` with a subclass of ``Backend`` below: its ``steps``
   (each a ``pfq_edge.steps.Step`` returning a typed ``StepResult``; the first must be named "export" and its
   result carry ``format`` and ``bytes``), its tool check, verdicts, report section, device README text and
   manifest entries. Drivers of its toolchain live in the same folder; files it writes go through ``export/``.
2. Its profile section: a pydantic model and a field in ``targets/profile.py`` named like ``Backend.section``.
3. A built-in profile ``targets/profiles/<name>.toml`` with ``kind`` set to the new kind.
4. One line in ``_REGISTRY`` below. New golden checks go into ``pfq_edge.golden.TOLERANCES``.
"""

from __future__ import annotations

import importlib

# kind → "module:class"; modules are imported on first use (keeps `pfq-edge --help` fast)
_REGISTRY = {
    "fpga": "pfq_edge.targets.backends.finn:FinnBackend",
    "cpu": "pfq_edge.targets.backends.tvm:TvmBackend",
    "gpu": "pfq_edge.targets.backends.tvm:TvmBackend",
}
_INSTANCES: dict[str, "Backend"] = {}


def kinds() -> tuple[str, ...]:
    """The profile kinds a backend is registered for."""
    return tuple(_REGISTRY)


def backend_for(kind: str) -> "Backend":
    """The backend of profile ``kind``; raises KeyError for an unregistered kind (the profile schema refuses it)."""
    spec = _REGISTRY[kind]
    if spec not in _INSTANCES:
        module, cls = spec.split(":")
        _INSTANCES[spec] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[spec]


def backends() -> list["Backend"]:
    """Each registered backend once."""
    return list({id(b): b for b in (backend_for(k) for k in _REGISTRY)}.values())


class Backend:
    """What one kind of target knows. Subclasses set the class attributes and override the methods they need.

    ``section``: the profile section holding this kind's settings; ``export_format``: the profile's export_format;
    ``engines``: the runtimes run.py can use for its package; ``plots``: {key: title} of the plots it draws.
    """

    name = ""
    section = ""
    export_format = ""
    engines: tuple[str, ...] = ()
    plots: dict[str, str] = {}

    @property
    def steps(self) -> list:
        """The steps after the shared front end and before package (``pfq_edge.steps.Step``)."""
        raise NotImplementedError

    def validate_profile(self, profile) -> str | None:
        """A reason why ``profile`` is inconsistent for this kind (the schema raises it), or None."""
        return None

    def channel_multiple(self, profile) -> int:
        """PfQ's channel multiple for this kind when the profile leaves ``pfq.channel_multiple`` unset: a layer that
        loses filters keeps a count that is a multiple of gcd(count, this) (pfq/plan.py, ``align_channels``).
        1: remove every constant filter."""
        return 1

    def check_tools(self, profile) -> None:
        """Before any work: the tools and facts this target needs exist. Raises ProfileError / ToolchainError."""

    def check_config(self, profile, config, several: bool) -> None:
        """Before any work: the compile options that only some targets take apply to ``profile`` (``several``:
        more than one target in this compile). Raises PfqError."""

    def runs_here(self, profile) -> bool:
        """Whether the compiled artefact runs (and can be measured or tuned) on this machine."""
        return False

    def bits_label(self, quant) -> str:
        """The bit widths as the summary states them, e.g. "W4A4 input 8-bit, per-tensor"."""
        return quant.describe()

    def profile_facts(self, profile) -> dict:
        """Key facts of this kind's profile section for ``pfq-edge targets --json``."""
        return {}

    def device_and_goal(self, facts: dict) -> tuple[str, str]:
        """The "device" and "goal" cells of ``pfq-edge targets`` from ``profile_facts``."""
        return "", ""

    def summary(self, c) -> dict:
        """This target's headline numbers, appended to the shared summary (report.json "summary")."""
        return {}

    def summary_rows(self, summary: dict) -> list[list]:
        """(quantity, value) rows of this target's summary (report.md and the terminal table)."""
        return []

    def latency_cell(self, row: dict) -> str:
        """The latency cell of a multi-target summary row."""
        return "—"

    def budget_missed(self, summary: dict) -> str | None:
        """A one-line reason if the result misses the profile's budget (exit 9), else None."""
        return None

    def markdown(self, doc: dict) -> list[str]:
        """This target's section of report.md, from a report.json document."""
        return []

    def render_plots(self, doc: dict, folder, title: str) -> list[str]:
        """Write this target's plots (keys of ``plots``) into ``folder``; returns the keys written."""
        return []

    def manifest(self, c) -> dict:
        """This target's manifest entries: {"latency": ..., "runtime": ..., "size": {extra sizes}}."""
        raise NotImplementedError

    def device_readme(self, info: dict) -> list[str]:
        """The "Run it" lines of the package's README.md, from the manifest fields ``info``."""
        return []
