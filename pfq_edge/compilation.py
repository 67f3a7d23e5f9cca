"""The one object a compile passes from step to step, and the typed results the steps leave in it.

FINN's builder passes one ModelWrapper and one config through its steps; pfq-edge passes a ``Compilation``: the
inputs (``CompileConfig``), the target ``profile``, the model's ``InputSpec`` and ``Dataset``, the three models a
compile makes (float, PfQ-pruned float, quantized), and ``results``: one typed ``StepResult`` per finished step, in
step order. A step reads what earlier steps produced from these fields and results — never from the report, which
only renders them (pfq_edge/report.py).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from pfq_edge.errors import OutputError, PfqError
from pfq_edge.golden import GoldenResult

FRONT_END_SECTIONS = ("quant", "pfq", "finetune")  # profile sections the shared front end reads


def front_end_settings(profile) -> dict:
    """The profile settings the shared front end depends on: targets with equal ones share one fine-tuned model."""
    return {k: getattr(profile, k).model_dump() for k in FRONT_END_SECTIONS}


@dataclass
class CompileConfig:
    """Inputs of one compile. ``overrides`` replace profile keys per section, e.g. {"quant": {"weight_bit_width":
    3}, "finetune": {"epochs": 0}} (None values are ignored). ``checkpoint``: fine-tuning checkpoint file, written
    after every epoch; ``resume`` continues from it. ``tuning_db``: a TVM MetaSchedule database folder to reuse
    (CPU targets; by default the ``tvm_tuning/`` of an existing ``out`` is reused). ``to_step`` / ``from_step``:
    stop after / resume from a named step (``pfq-edge compile --list-steps``)."""

    model: str
    target: str
    out: Path
    weights: Path | None = None
    overrides: dict = field(default_factory=dict)
    data_dir: Path | None = None
    force: bool = False
    checkpoint: Path | None = None
    resume: bool = False
    tuning_db: Path | None = None
    to_step: str | None = None
    from_step: str | None = None
    data: object = None          # a pfq_edge.datasets.DataSpec; None: Fashion-MNIST from ``data_dir``
    model_args: dict = field(default_factory=dict)  # keyword arguments for a ``module:factory`` model

    @property
    def data_spec(self):
        from pfq_edge.datasets import DataSpec

        return self.data if self.data is not None else DataSpec(data_dir=self.data_dir)

    def check(self) -> None:
        """Validate the options that need no profile or model, before any heavy import. Raises PfqError (one line;
        OutputError for an unusable checkpoint path)."""
        if self.resume and self.checkpoint is None:
            raise PfqError("--resume needs --checkpoint FILE")
        if self.checkpoint is not None:
            _check_writable_file(Path(self.checkpoint), "--checkpoint", "qat.pt")
        if self.tuning_db is not None and not (Path(self.tuning_db) / "database_tuning_record.json").is_file():
            raise PfqError(f"--tuning-db {self.tuning_db}: no MetaSchedule database there "
                           f"(database_tuning_record.json)")


def _check_writable_file(path: Path, option: str, example: str) -> None:
    import tempfile

    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory; give a file path, e.g. {path}/{example}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".pfq-edge-probe"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write {option} {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class InputSpec:
    """What the model takes and gives: one image (C, H, W) float32 in [0, 1]; logits (N, len(classes)).
    ``normalization``: per-channel (mean, std) the compiled model applies to its input (None: none)."""

    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Dataset:
    """The images a compile uses: ``train`` (calibration, fine-tuning), ``val`` (early stopping; optional) and
    ``test`` (top-1, golden checks), each a ``pfq_edge.datasets.Split``; ``classes`` their names, ``shape`` one
    image (C, H, W), ``normalization`` (mean, std) or None, ``record`` the manifest's dataset entry
    (pfq_edge/datasets/__init__.py, ``load_dataset``)."""

    name: str
    train: object
    test: object
    val: object | None = None
    classes: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()
    normalization: tuple | None = None
    record: dict = field(default_factory=dict)


@dataclass
class StepResult:
    """Base of every step's result: plain, JSON-able facts (no models, no tensors).

    ``report()`` is the step's section of report.json (golden checks under "golden" / "guard"); ``accuracy`` the
    top-1 figures it measured (keys of report.ACCURACY_LABELS); the paths it wrote, relative to the output folder,
    as {name in the package: path} (``artefacts``) and ``kept`` (stays beside the package).
    ``to_state`` / ``from_state`` round-trip the result through steps/state.json for ``--from-step``.
    """

    step: ClassVar[str] = ""

    def report(self) -> dict:
        return {k: v.as_dict() if isinstance(v, GoldenResult) else v
                for k, v in dataclasses.asdict(self).items() if v is not None}

    @property
    def accuracy(self) -> dict[str, float]:
        return {}

    @property
    def artefacts(self) -> dict[str, str]:
        return {}

    @property
    def kept(self) -> list[str]:
        return []

    def to_state(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, data: dict):
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            v = data.get(f.name)
            if v is not None and "GoldenResult" in str(hints.get(f.name)):
                v = GoldenResult.from_dict(v)
            values[f.name] = v
        return cls(**values)


@dataclass
class Compilation:
    """One compile of one model for one target (see the module docstring). ``work`` is the staging folder this
    target's output is written in; ``final`` where it lands. ``float_logits``: the float model's test-set logits
    (N, classes), kept by load for the prune check."""

    config: CompileConfig
    profile: object
    work: Path
    final: Path
    spec: InputSpec | None = None
    data: Dataset | None = None
    float_model: object = None
    pruned_model: object = None
    qmodel: object = None
    float_logits: object = None
    results: dict[str, StepResult] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    log: Callable[[str], None] | None = None

    def say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    def result(self, step: str) -> StepResult:
        return self.results[step]

    @property
    def accuracy(self) -> dict[str, float]:
        """Top-1 per stage of the model, in step order (float, PfQ float, PTQ, fine-tuned, deployed)."""
        return {k: v for r in self.results.values() for k, v in r.accuracy.items()}

    @property
    def artefacts(self) -> dict[str, Path]:
        """{name in the package: file in ``work``} of every finished step."""
        return {name: self.work / rel for r in self.results.values() for name, rel in r.artefacts.items()}
