"""Any ASE calculator as a reference adapter, each calculation in its own process and folder.

The adapter writes the structure and a ``job.json`` into the calculation's run folder and
starts ``python -m ionflow.dft_adapters.ase_run`` there (see :mod:`ionflow.dft_adapters.ase_run`),
in a new process group, with stdout and stderr kept as files. That child builds the
calculator (CP2K, Quantum ESPRESSO, NWChem, ORCA or any ``module:Class``) with the run folder
as its directory, so the code's own inputs and outputs stay there too. The parent:

* kills the whole process group when ``timeout_s`` passes (status ``timeout``);
* reads a crash, an exception or unreadable/non-finite results as ``failed``, with the error
  text and the last lines of stderr;
* searches the code's output for its "SCF not converged" message (CP2K, for one, warns and
  carries on with unconverged forces) and then retries with changed settings, each attempt in
  its own sub-folder ``attempt-N``; when every attempt fails to converge, the status is
  ``unconverged`` with the reason.

Units: ASE calculators return eV, eV/Å, eV/Å^3 and e·Å; nothing is converted.
Charge and multiplicity come from ``atoms.info`` and are passed with the calculator's own
parameters (built in for CP2K; ``charge_parameter`` / ``multiplicity_parameter`` for others).
A charged or open-shell structure is refused, before anything runs, when the adapter does
not know how to tell the calculator.

Longer than ionflow's other modules because its parts (the settings, the per-code knowledge of
CP2K, process-group control, output scanning and retries) make one calculation's life cycle and
are read together; the child's side is :mod:`ionflow.dft_adapters.ase_run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ase
import numpy as np
from ase import Atoms
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ionflow.dft_adapters.ase_run import USAGE_FILE
from ionflow.dft_adapters.base import (
    LabelResult,
    SettingError,
    check_charge_states,
    check_run_dirs,
    child_environment,
    finish_run_dir,
    make_result,
    settings_hash,
    start_run_dir,
)
from ionflow.platform.structures import charge_of, multiplicity_of

#: Settings that change how a calculation runs, not what it computes: left out of the hash.
RUNTIME_ONLY = frozenset({"command", "retries", "unconverged_patterns"})

#: Output files larger than this are searched only in their last part (bytes).
SCAN_BYTES = 4_000_000

#: Files of the run folder that are ionflow's, not the code's: never searched for SCF messages.
OWN_FILES = frozenset({"structure.extxyz", "job.json", "results.npz", "error.json", "result.json"})


def _merge_cp2k_input(base: str, extra: str) -> str:
    """CP2K input ``base`` with the keywords and sections of ``extra`` added or replaced."""
    from ase.calculators.cp2k import parse_input

    def merge(into: Any, new: Any) -> None:
        for keyword in new.keywords:
            key = keyword.split()[0].upper()
            into.keywords = [k for k in into.keywords if k.split()[0].upper() != key] + [keyword]
        for sub in new.subsections:
            same = [s for s in into.subsections if s.name == sub.name and s.params == sub.params]
            if same:
                merge(same[0], sub)
            else:
                into.subsections.append(sub)

    root = parse_input(base)
    merge(root, parse_input(extra))
    return "\n".join(root.write())


@dataclass(frozen=True)
class Code:
    """What ionflow knows about one code behind an ASE calculator."""

    #: calculator parameters that give it the total charge and the multiplicity
    charge_state: Callable[[int, int], dict[str, Any]] | None = None
    #: regular expressions the code prints when its SCF did not converge
    unconverged: tuple[str, ...] = ()
    #: parameter changes tried in turn after an unconverged SCF, from the base parameters
    retries: Callable[[dict[str, Any]], list[dict[str, Any]]] = lambda parameters: []
    #: how to merge one parameter of a retry into the base parameters (default: replace)
    merge: dict[str, Callable[[Any, Any], Any]] = field(default_factory=dict)
    #: a regular expression whose first group is the code's version, searched in its output
    version: str | None = None
    #: properties the adapter asks for (others the calculator may not implement)
    properties: tuple[str, ...] = ("stress", "dipole", "charges")


def _cp2k_retries(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    max_scf = int(parameters.get("max_scf", 50))
    return [
        # more iterations, from the atomic guess with gentler Broyden mixing
        {"max_scf": 4 * max_scf},
        {
            "max_scf": 4 * max_scf,
            "inp": "&FORCE_EVAL\n&DFT\n&SCF\nSCF_GUESS ATOMIC\n&MIXING\nMETHOD BROYDEN_MIXING\n"
            "ALPHA 0.1\n&END MIXING\n&END SCF\n&END DFT\n&END FORCE_EVAL",
        },
    ]


#: Codes ionflow knows by their ASE name. Others work too, through ``module:Class`` and the
#: ``charge_parameter`` / ``multiplicity_parameter`` / ``unconverged_patterns`` settings.
CODES: dict[str, Code] = {
    "cp2k": Code(
        charge_state=lambda q, m: {"charge": q, "multiplicity": m, "uks": m != 1},
        unconverged=(r"SCF run NOT converged",),
        retries=_cp2k_retries,
        merge={"inp": _merge_cp2k_input},
        version=r"CP2K version (\S+)",
        properties=("stress",),
    ),
}


def _non_finite(value: Any) -> bool:
    """Whether a float NaN or infinity is anywhere in nested lists and mappings."""
    if isinstance(value, float):
        return not np.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


class ASESettings(BaseModel):
    """Which ASE calculator runs, with which parameters, and how its failures are recognised."""

    model_config = ConfigDict(extra="forbid")

    calculator: str = Field(
        description="ASE calculator: an ASE name ('cp2k', 'espresso', 'nwchem', ...), 'module:Class' "
        "or 'path/to/file.py:Class'."
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the calculator (the level of theory)."
    )
    command: str | None = Field(
        None, description="Command that runs the code (e.g. 'cp2k_shell'); None: the calculator's default."
    )
    charge_parameter: str | None = Field(
        None, description="Calculator parameter that takes the total charge (known codes: built in)."
    )
    multiplicity_parameter: str | None = Field(
        None, description="Calculator parameter that takes the spin multiplicity 2S+1 (known codes: built in)."
    )
    unconverged_patterns: list[str] | None = Field(
        None, description="Regular expressions the code prints for an unconverged SCF (None: built in for known codes)."
    )
    retries: list[dict[str, Any]] | None = Field(
        None,
        description="Parameter changes tried in turn after an unconverged SCF (None: built in for known codes; "
        "[] for none).",
    )

    @field_validator("calculator")
    @classmethod
    def _known_calculator(cls, spec: str) -> str:
        from ionflow.dft_adapters.ase_run import calculator_class

        where = spec.rpartition(":")[0]
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise ValueError(f"calculator file {where} does not exist")
            return spec  # executed in the child process only
        try:
            calculator_class(spec)
        except (ImportError, ValueError, KeyError, AttributeError) as exc:
            raise ValueError(f"unknown ASE calculator {spec!r}: {exc}") from None
        return spec

    @field_validator("parameters", "retries")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if _non_finite(value):
            raise ValueError("NaN or infinity among the calculator parameters")
        return value

    @field_validator("unconverged_patterns")
    @classmethod
    def _patterns(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {pattern!r} ({exc})") from None
        return patterns


class ASEAdapter:
    """Labels structures with an ASE calculator, one child process and run folder per calculation."""

    name = "ase"
    isolated = True

    def __init__(
        self,
        settings: ASESettings | dict[str, Any],
        timeout_s: float | None = None,
        num_threads: int | None = None,
        scratch: Path | None = None,
    ) -> None:
        if not isinstance(settings, ASESettings):
            settings = ASESettings(**settings)
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        self.settings = settings
        self.timeout_s = timeout_s
        self.num_threads = num_threads
        self.scratch = Path(scratch) if scratch is not None else None
        self.code = CODES.get(settings.calculator.lower(), Code())
        self.code_name = settings.calculator.rpartition(":")[2].lower()
        self.settings_hash = settings_hash(self.name, settings.model_dump(exclude=set(RUNTIME_ONLY)))

    @property
    def code_version(self) -> str:
        return f"unknown (ase {ase.__version__})"

    # -- checks before any work -------------------------------------------------------------

    def _charge_parameters(self, charge: int, multiplicity: int) -> dict[str, Any] | None:
        """Calculator parameters for this charge state, or None when the calculator cannot be told."""
        s = self.settings
        if s.charge_parameter or s.multiplicity_parameter:
            out: dict[str, Any] = {}
            if s.charge_parameter:
                out[s.charge_parameter] = charge
            elif charge != 0:
                return None
            if s.multiplicity_parameter:
                out[s.multiplicity_parameter] = multiplicity
            elif multiplicity != 1:
                return None
            return out
        if self.code.charge_state is not None:
            return self.code.charge_state(charge, multiplicity)
        return {} if (charge, multiplicity) == (0, 1) else None

    def check(self, structures: list[Atoms]) -> None:
        check_charge_states(structures)
        untold = [
            f"structure {i} (charge {charge_of(a)}, multiplicity {multiplicity_of(a)})"
            for i, a in enumerate(structures)
            if self._charge_parameters(charge_of(a), multiplicity_of(a)) is None
        ]
        if untold:
            raise ValueError(
                f"the ase adapter does not know how to give calculator {self.settings.calculator!r} a charge or "
                f"spin: {'; '.join(untold)}; set reference.settings.charge_parameter and multiplicity_parameter"
            )
        setting = "command" if self.settings.command else "parameters.command"
        command = self.settings.command or self.settings.parameters.get("command")
        if command:
            program = shlex.split(command)[0]
            if shutil.which(program) is None:
                raise SettingError(
                    setting, f"command {program!r} of calculator {self.settings.calculator!r} is not on PATH"
                )

    # -- labelling ----------------------------------------------------------------------------

    def label(self, structures: list[Atoms], run_dirs: Sequence[Path] | None = None) -> list[LabelResult]:
        """Label each structure in its own child process; ``run_dirs`` keeps every file (else a
        temporary folder under ``scratch`` or the system's, removed afterwards)."""
        self.check(structures)
        dirs = check_run_dirs(structures, run_dirs)
        results = []
        for atoms, run_dir in zip(structures, dirs):
            if run_dir is not None:
                results.append(self._label_one(atoms, run_dir))
                continue
            with tempfile.TemporaryDirectory(prefix="ionflow-ase-", dir=self.scratch) as tmp:
                result = self._label_one(atoms, Path(tmp))
                result.run_dir = None
                results.append(result)
        return results

    def _attempts(self) -> list[dict[str, Any]]:
        base = dict(self.settings.parameters)
        changes = self.settings.retries if self.settings.retries is not None else self.code.retries(base)
        attempts = [base]
        for change in changes:
            params = dict(base)
            for key, value in change.items():
                merge = self.code.merge.get(key)
                params[key] = merge(str(base.get(key, "")), value) if merge is not None else value
            attempts.append(params)
        return attempts

    def _label_one(self, atoms: Atoms, run_dir: Path) -> LabelResult:
        start = time.perf_counter()
        run_dir = run_dir.resolve()
        start_run_dir(run_dir, atoms)
        charge_params = self._charge_parameters(charge_of(atoms), multiplicity_of(atoms)) or {}
        attempts = self._attempts()
        tried = []
        fields: dict[str, Any] = {}
        for n, params in enumerate(attempts):
            folder = run_dir / f"attempt-{n}"
            remaining = None if self.timeout_s is None else self.timeout_s - (time.perf_counter() - start)
            fields = self._run(atoms, folder, {**params, **charge_params}, remaining)
            tried.append(n if n == 0 else {k: v for k, v in params.items() if attempts[0].get(k) != v})
            if fields["status"] != "unconverged":
                break
        if fields["status"] == "unconverged" and len(attempts) > 1:
            changes = "; ".join(", ".join(f"{k}={_short(v)}" for k, v in change.items()) for change in tried[1:])
            fields["error"] = f"{fields['error']}; nor with any of {len(attempts) - 1} retries ({changes})"
        fields["cpu_time_s"] = _cpu_seconds([run_dir / f"attempt-{n}" for n in range(len(tried))])
        fields.setdefault("extra", {})["attempts"] = len(tried)
        if len(tried) > 1:
            fields["extra"]["retries"] = tried[1:]
        result = make_result(self, time.perf_counter() - start, run_dir, code=self.code_name, **fields)
        finish_run_dir(run_dir, result)
        return result

    def _run(self, atoms: Atoms, folder: Path, parameters: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        """One attempt in ``folder``: the fields of a LabelResult (status, error, arrays)."""
        folder.mkdir(parents=True, exist_ok=True)
        for stale in ("results.npz", "error.json", USAGE_FILE):
            (folder / stale).unlink(missing_ok=True)
        shutil.copyfile(folder.parent / "structure.extxyz", folder / "structure.extxyz")
        job = {
            "calculator": self.settings.calculator,
            "parameters": parameters,
            "command": self.settings.command,
            "properties": list(self.code.properties),
        }
        (folder / "job.json").write_text(json.dumps(job, indent=2))
        if timeout_s is not None and timeout_s <= 0:
            return {"status": "timeout", "error": f"no time left of the {self.timeout_s:g} s limit for a retry"}
        with open(folder / "stdout.txt", "wb") as out, open(folder / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ionflow.dft_adapters.ase_run", str(folder)],
                cwd=folder,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=child_environment(self.num_threads),
                start_new_session=True,  # its own process group: a timeout kills the code too
            )
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return {
                    "status": "timeout",
                    "error": f"no result after {self.timeout_s:g} s: the calculation was killed (run folder {folder})",
                }
            except BaseException:
                _kill_group(proc)  # interrupted: leave no orphaned code behind
                raise
            finally:
                _kill_group(proc, only_children=True)
        return self._read(atoms, folder, returncode)

    def _unconverged(self, folder: Path) -> str | None:
        """The first line in the code's output that says the SCF did not converge."""
        patterns = self.settings.unconverged_patterns
        if patterns is None:
            patterns = list(self.code.unconverged)
        if not patterns:
            return None
        regex = re.compile("|".join(f"(?:{p})" for p in patterns))
        for path in sorted(folder.iterdir()):
            if path.name in OWN_FILES or not path.is_file():
                continue
            text = _tail_text(path)
            match = regex.search(text)
            if match:
                where = (
                    f"line {text.count(chr(10), 0, match.start()) + 1}"
                    if path.stat().st_size <= SCAN_BYTES
                    else "near the end"
                )
                return f"{match.group(0).strip()} ({path.name}, {where})"
        return None

    def _version(self, folder: Path) -> str | None:
        if self.code.version is None:
            return None
        regex = re.compile(self.code.version)
        for path in sorted(folder.iterdir()):
            if path.name in OWN_FILES or not path.is_file() or path.stat().st_size > SCAN_BYTES:
                continue
            match = regex.search(path.read_text(errors="replace"))
            if match:
                return match.group(1)
        return None

    def _read(self, atoms: Atoms, folder: Path, returncode: int) -> dict[str, Any]:
        version = self._version(folder)
        fields: dict[str, Any] = {"code_version": version} if version else {}
        unconverged = self._unconverged(folder)
        if returncode != 0:
            error = _child_error(folder, returncode)
            if unconverged or error.get("scf"):
                return {**fields, "status": "unconverged", "error": unconverged or error["text"]}
            return {**fields, "status": "failed", "error": error["text"]}
        if unconverged:
            return {**fields, "status": "unconverged", "error": unconverged}
        try:
            with np.load(folder / "results.npz") as data:
                arrays = {key: np.array(data[key], dtype=float) for key in data.files}
            problem = _results_problem(atoms, arrays)
        except (OSError, ValueError, KeyError) as exc:
            problem = f"unreadable results ({type(exc).__name__}: {exc})"
        if problem:
            return {**fields, "status": "failed", "error": f"{problem} (run folder {folder})"}
        fields.update(
            status="ok",
            energy=float(arrays["energy"]),
            forces=arrays["forces"],
            stress=arrays.get("stress") if np.all(atoms.pbc) else None,
            dipole=arrays.get("dipole") if not np.any(atoms.pbc) else None,
            charges=arrays.get("charges"),
            charge_scheme=f"{self.code_name} default" if "charges" in arrays else None,
        )
        return fields


def _cpu_seconds(folders: list[Path]) -> float | None:
    """CPU seconds of every attempt, as each child reported it; None when one could not say
    (killed at the timeout, or it died): a partial sum would understate the cost."""
    total = 0.0
    for folder in folders:
        try:
            total += float(json.loads((folder / USAGE_FILE).read_text())["cpu_time_s"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total


def _kill_group(proc: subprocess.Popen, only_children: bool = False) -> None:
    """SIGKILL the child's process group (the code it started included); with ``only_children``,
    only what is left after the child itself has exited (e.g. a code server it did not close)."""
    if only_children and proc.poll() is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if not only_children:
        proc.wait()


def _short(value: Any, width: int = 100) -> str:
    """A parameter value on one line, cut to ``width`` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _tail_text(path: Path) -> str:
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - SCAN_BYTES))
        return handle.read().decode(errors="replace")


def _child_error(folder: Path, returncode: int) -> dict[str, Any]:
    """What the child said went wrong (error.json), or how it died, with the end of its stderr."""
    stderr = _tail_text(folder / "stderr.txt").strip().splitlines()[-5:] if (folder / "stderr.txt").exists() else []
    try:
        reported = json.loads((folder / "error.json").read_text())
    except (OSError, ValueError):
        reported = None
    if reported is not None:
        return {"text": f"{reported['type']}: {reported['message']}".strip(), "scf": bool(reported.get("scf"))}
    if returncode < 0:
        how = f"killed by signal {signal.Signals(-returncode).name}"
    else:
        how = f"exited with code {returncode}"
    tail = " | ".join(stderr)
    return {
        "text": f"the calculation process {how} without results" + (f"; stderr: {tail}" if tail else ""),
        "scf": False,
    }


def _results_problem(atoms: Atoms, arrays: dict[str, np.ndarray]) -> str | None:
    """Why the results cannot be labels (missing, wrong shape, not finite), or None."""
    n = len(atoms)
    if "energy" not in arrays or arrays["energy"].shape != ():
        return "no energy in the results"
    if "forces" not in arrays or arrays["forces"].shape != (n, 3):
        return f"forces of shape {arrays.get('forces', np.empty(0)).shape}, expected ({n}, 3)"
    expected = {"stress": (6,), "dipole": (3,), "charges": (n,)}
    for key, value in arrays.items():
        if key in expected and value.shape != expected[key]:
            return f"{key} of shape {value.shape}, expected {expected[key]}"
        if not np.all(np.isfinite(value)):
            return f"non-finite {key} in the results"
    return None
