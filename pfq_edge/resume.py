"""What ``--to-step`` leaves and ``--from-step`` reuses: ``steps/`` in a compile's output folder.

``steps/state.json`` holds the inputs every finished step depended on (model, weights file hash, data, and the
profile keys named by ``Step.reads``) and each step's result; models live beside it as safetensors (the quantized
model after quantize and after finetune — tensors only, no pickled code). FINN's builder saves an intermediate
model after each step in the same spirit. Resuming checks the inputs of every reused step against today's and
refuses, naming the first difference, if any changed.
"""

from __future__ import annotations

import json
import shutil
import typing
from pathlib import Path

from pfq_edge.errors import PfqError

STATE_DIR = "steps"
STATE_FILE = "state.json"
FORMAT = "pfq-edge-steps"
FORMAT_VERSION = 1


def base_inputs(c, weights_sha256: str | None) -> dict:
    """What every step depends on: the model (and its factory's arguments), its weights (by content), the data
    (source and preprocessing; its content is compared after the load step's restore) and the target kind."""
    return {"model": c.config.model, "model_args": c.config.model_args, "weights_sha256": weights_sha256,
            "data": c.config.data_spec.facts(), "kind": c.profile.kind}


def step_inputs(profile, step) -> dict:
    """The profile keys ``step.reads`` names ("quant" or "quant.weight_bit_width"), with their values."""
    out = {}
    for key in step.reads:
        section, _, name = key.partition(".")
        value = getattr(profile, section)
        value = value.model_dump() if hasattr(value, "model_dump") else value
        out[key] = value[name] if name else value
    return out


def save_state(c, plan: list, folder: Path) -> None:
    """Write ``folder``/state.json for the steps of ``plan`` finished in ``c`` (atomically)."""
    from pfq_edge.io import atomic_write_text
    from pfq_edge.report import to_json

    from pfq_edge.export.package import sha256_file

    done = [s for s in plan if s.name in c.results]
    loaded = c.result("load")  # the hashes of the model and weights, computed once when they were loaded
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "target": c.profile.name,
           "inputs": base_inputs(c, loaded.weights_sha256), "model_sha256": loaded.source_sha256,
           "steps": [{"name": s.name, "reads": step_inputs(c.profile, s), "result": c.results[s.name].to_state(),
                      "files": {f: sha256_file(folder / f) for f in s.saves if (folder / f).is_file()}}
                     for s in done]}
    folder.mkdir(exist_ok=True)
    atomic_write_text(folder / STATE_FILE, to_json(doc))


def read_state(out: Path, option: str) -> dict:
    """state.json of output folder ``out``; raises PfqError (one line) if there is none or it is unreadable."""
    path = Path(out) / STATE_DIR / STATE_FILE
    if not path.is_file():
        raise PfqError(f"{option}: {out} holds no {STATE_DIR}/{STATE_FILE} to resume from (run `pfq-edge compile` "
                       f"with this --out first)")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise PfqError(f"{option}: {path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION \
            or not isinstance(doc.get("steps"), list):
        raise PfqError(f"{option}: {path} is not a pfq-edge step state of version {FORMAT_VERSION}")
    return doc


def _first_difference(old, new, where: str) -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
            if diff:
                return diff
        return None
    return None if old == new else f"{where} was {old!r}, now {new!r}"


def resume(c, plan: list, from_step: str, out: Path) -> list:
    """Take the results and files of the steps before ``from_step`` from output folder ``out`` into ``c`` (its
    ``work`` folder), rebuild their in-memory state, and return the steps still to run. Raises PfqError if ``out``
    has not finished those steps or was compiled from other inputs."""
    option = f"--from-step {from_step}"
    doc = read_state(out, option)
    names = [s.name for s in plan]
    reused = plan[:names.index(from_step)]
    saved = {s["name"]: s for s in doc["steps"]}
    missing = [s.name for s in reused if s.name not in saved]
    if missing:
        raise PfqError(f"{option}: {out} stopped before step {missing[0]!r}; resume from it or an earlier step")
    from pfq_edge.export.package import sha256_file, state_dict_sha256

    weights = Path(c.config.weights) if c.config.weights else None
    diff = _first_difference(doc["inputs"], base_inputs(c, sha256_file(weights) if weights else None), "")
    for step in reused:
        diff = diff or _first_difference(saved[step.name]["reads"], step_inputs(c.profile, step), "")
    if diff:
        raise PfqError(f"{option}: {out} was compiled from other inputs ({diff}); compile again without "
                       f"--from-step")
    for step in reused:
        for name, digest in saved[step.name].get("files", {}).items():
            path = Path(out) / STATE_DIR / name
            if not path.is_file() or sha256_file(path) != digest:
                raise PfqError(f"{option}: {Path(out) / STATE_DIR / name} is missing or does not match its sha256 in "
                               f"{STATE_FILE} (modified); compile again without --from-step")
    shutil.copytree(Path(out) / STATE_DIR, c.work / STATE_DIR)
    for step in reused:
        result_type = typing.get_type_hints(step.run)["return"]
        result = result_type.from_state(saved[step.name]["result"])
        for rel in [*result.artefacts.values(), *result.kept]:
            src, dst = Path(out) / rel, c.work / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        c.results[step.name] = result
    state = c.work / STATE_DIR
    for step in reused:
        if step.restore is not None:
            step.restore(c, state)
        if step.name == "load" and c.results["load"].dataset.get("sha256") != c.data.record.get("sha256"):
            raise PfqError(f"{option}: the images of {c.config.data_spec.source} changed since {out} was compiled "
                           f"(dataset sha256 differs); compile again without --from-step")
        if step.name == "load" and doc.get("model_sha256") != state_dict_sha256(c.float_model):
            raise PfqError(f"{option}: {out} was compiled from another model (the weights of {c.config.model!r} "
                           f"differ); compile again without --from-step")
    return plan[len(reused):]

