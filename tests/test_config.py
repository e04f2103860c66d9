"""The campaign file: the example loads; every mistake is caught at the edge, naming file and field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ase import Atoms
from ase.io import write

from ionflow.config import CampaignConfig, ConfigError, load_config
from tests.structures import ZUNDEL

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"

BASE = {
    "name": "zundel-test",
    "system": {"charge": 1, "multiplicity": 1, "structure": ZUNDEL},
    "reference": {"adapter": "tblite", "settings": {"accuracy": 0.5}},
    "model": {"ensemble_size": 2, "hidden_irreps": "8x0e+8x1o"},
    "explore": {"steps": 20, "sample_every": 5},
}


def write_config(tmp_path: Path, raw: dict, name: str = "campaign.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def config_error(tmp_path: Path, change) -> str:
    raw = copy.deepcopy(BASE)
    change(raw)
    path = write_config(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


def test_quickstart_example_loads():
    cfg = load_config(EXAMPLE)
    assert isinstance(cfg, CampaignConfig)
    assert cfg.name == "zundel-quickstart"
    atoms = cfg.system.atoms()
    assert atoms.get_chemical_formula() == "H5O2"
    assert atoms.info == {"charge": 1, "multiplicity": 1}
    assert cfg.reference.adapter == "pyscf"
    assert cfg.reference.settings["xc"] == "pbe"
    assert cfg.model.ensemble_size == 3
    assert cfg.explore.sample_every <= cfg.explore.steps
    assert cfg.selection.threshold < cfg.selection.ceiling


def test_minimal_config_fills_defaults_and_validates_adapter_settings(tmp_path):
    cfg = load_config(write_config(tmp_path, BASE))
    assert cfg.model.r_max == 4.0 and cfg.model.dtype == "float64"
    assert cfg.reference.settings["accuracy"] == 0.5
    assert cfg.reference.settings["method"] == "GFN2-xTB", "adapter defaults are filled in"
    assert cfg.campaign_dir == (Path("runs") / "zundel-test").resolve()
    assert cfg.db_url.startswith("sqlite:///") and cfg.db_url.endswith("ionflow.db")


def test_science_hash_ignores_where_but_not_what(tmp_path):
    a = load_config(write_config(tmp_path, BASE, "a.yaml"))
    b = load_config(write_config(tmp_path, {**BASE, "workdir": "elsewhere", "iterations": 9}, "b.yaml"))
    c = load_config(write_config(tmp_path, {**BASE, "seed": 1}, "c.yaml"))
    assert a.science_hash() == b.science_hash()
    assert a.science_hash() != c.science_hash()


def test_unknown_top_level_key(tmp_path):
    message = config_error(tmp_path, lambda r: r.update(iteratons=4))
    assert "iteratons" in message and "unknown key" in message


@pytest.mark.parametrize("section", ["model", "training", "explore", "selection", "bootstrap", "system"])
def test_unknown_key_in_a_section(tmp_path, section):
    message = config_error(tmp_path, lambda r: r.setdefault(section, {}).update(colour="red"))
    assert f"{section}.colour" in message and "unknown key" in message


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("explore", "steps", 0),
        ("explore", "timestep_fs", -0.5),
        ("model", "ensemble_size", 1),
        ("model", "r_max", 0.0),
        ("training", "learning_rate", 0.0),
        ("selection", "per_iteration", 0),
        ("bootstrap", "rattle_stdev", -0.1),
        (None, "iterations", 0),
    ],
)
def test_out_of_range_values_name_the_field(tmp_path, section, field, value):
    def change(raw):
        (raw.setdefault(section, {}) if section else raw)[field] = value

    message = config_error(tmp_path, change)
    assert (f"{section}.{field}" if section else f"{field}:") in message


def test_inconsistent_sections_are_explained(tmp_path):
    message = config_error(tmp_path, lambda r: r["explore"].update(steps=4, sample_every=5))
    assert "sample_every" in message
    message = config_error(tmp_path, lambda r: r.update(selection={"threshold": 1.0, "ceiling": 0.5}))
    assert "ceiling" in message and "threshold" in message
    message = config_error(tmp_path, lambda r: r.update(training={"energy_weight": 0, "forces_weight": 0}))
    assert "energy_weight" in message


def test_charge_inconsistent_with_multiplicity_mentions_electrons(tmp_path):
    message = config_error(tmp_path, lambda r: r["system"].update(charge=0))  # H5O2: 21 electrons
    assert "electrons" in message and "21" in message
    assert "multiplicity 1" in message
    assert "H5O2" in message


def test_consistent_radical_is_accepted(tmp_path):
    raw = copy.deepcopy(BASE)
    hydroxyl = {"symbols": ["O", "H"], "positions": [[0, 0, 0], [0, 0, 0.98]]}
    raw["system"] = {"charge": 0, "multiplicity": 2, "structure": hydroxyl}
    cfg = load_config(write_config(tmp_path, raw))
    assert cfg.system.atoms().info == {"charge": 0, "multiplicity": 2}


def test_unknown_element_is_named(tmp_path):
    message = config_error(tmp_path, lambda r: r["system"]["structure"]["symbols"].__setitem__(2, "Xx"))
    assert "system.structure.symbols: unknown element(s): Xx" in message
    # the file-path branch of the union, and pydantic's internal names, are noise for an inline structure
    assert "not a valid path" not in message and "function-after" not in message


def test_symbols_and_positions_must_match(tmp_path):
    message = config_error(tmp_path, lambda r: r["system"]["structure"]["positions"].pop())
    assert "7 symbols but 6 positions" in message


def test_overlapping_atoms_are_named(tmp_path):
    message = config_error(tmp_path, lambda r: r["system"]["structure"]["positions"].__setitem__(3, [0.0, 0.0, 0.1]))
    assert "overlap" in message
    assert "atoms 2 (H) and 3 (H)" in message


def test_unknown_adapter_lists_the_known_ones(tmp_path):
    message = config_error(tmp_path, lambda r: r["reference"].update(adapter="vasp"))
    assert "vasp" in message
    assert "pyscf" in message and "tblite" in message


def test_unknown_adapter_setting(tmp_path):
    message = config_error(tmp_path, lambda r: r["reference"]["settings"].update(basis="def2-svp"))
    assert "reference.settings.basis: unknown key (not a setting of the tblite adapter)" in message


def test_bad_irreps_are_rejected(tmp_path):
    message = config_error(tmp_path, lambda r: r["model"].update(hidden_irreps="8xbanana"))
    assert "model.hidden_irreps" in message and "8xbanana" in message


def test_structure_file_is_relative_to_the_yaml_file(tmp_path, monkeypatch):
    folder = tmp_path / "campaigns"
    (folder / "geometries").mkdir(parents=True)
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    write(folder / "geometries" / "water.xyz", water)
    raw = copy.deepcopy(BASE)
    raw["system"] = {"charge": 0, "multiplicity": 1, "structure": "geometries/water.xyz"}
    path = write_config(folder, raw)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a relative path must not depend on the working directory
    cfg = load_config(path)
    assert Path(cfg.system.structure) == (folder / "geometries" / "water.xyz").resolve()
    atoms = cfg.system.atoms()
    assert atoms.get_chemical_formula() == "H2O"
    assert atoms.info == {"charge": 0, "multiplicity": 1}

    raw["system"]["structure"] = "geometries/missing.xyz"
    message = config_error(folder, lambda r: r.update(system=raw["system"]))
    assert "missing.xyz" in message and "does not exist" in message


def test_structure_file_charge_state_is_checked(tmp_path):
    write(tmp_path / "oh.xyz", Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.98]]))
    message = config_error(tmp_path, lambda r: r.update(system={"charge": 0, "multiplicity": 1, "structure": "oh.xyz"}))
    assert "electrons" in message


def test_file_level_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="no such campaign file") as info:
        load_config(missing)
    assert str(info.value).startswith(str(missing))

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(broken)
    assert str(info.value).startswith(str(broken))

    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping") as info:
        load_config(listing)
    assert str(info.value).startswith(str(listing))

    message = config_error(tmp_path, lambda r: r.pop("system"))
    assert "system" in message


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write_config(tmp_path, BASE)
    assert load_config(path, overrides={"seed": 7}).seed == 7
    with pytest.raises(ConfigError, match="seed"):
        load_config(path, overrides={"seed": -1})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_the_quickstart_file_validates_in_a_fresh_interpreter():
    """Reading a campaign file first thing in a process (as ``ionflow run`` does) must load mace
    before e3nn: the import order that the in-process tests cannot see."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    code = "from ionflow.config import load_config; print(load_config('examples/quickstart.yaml').name)"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "zundel-quickstart"


def _zundel_frames(n: int, **info) -> list[Atoms]:
    frames = []
    for k in range(n):
        atoms = Atoms(ZUNDEL["symbols"], positions=ZUNDEL["positions"])
        atoms.positions[2, 2] += 0.01 * k
        atoms.info.update(info)
        frames.append(atoms)
    return frames


@pytest.mark.parametrize(
    ("frames", "words"),
    [
        (lambda: [], ("cannot read", "Empty file")),
        (
            lambda: [Atoms("NaCl", positions=[[0, 0, 0], [0, 0, 2.4]])],
            ("frame 0", "Cl, Na", "system's structure lacks"),
        ),
        (lambda: _zundel_frames(2, charge=1, multiplicity=2), ("frame 0", "charge/multiplicity")),
        (lambda: _zundel_frames(2)[:1] + [Atoms(ZUNDEL["symbols"], positions=[[0, 0, 0]] * 7)], ("frame 1", "apart")),
    ],
)
def test_test_file_problems_name_the_file_and_frame(tmp_path, frames, words):
    path = tmp_path / "test.extxyz"
    path.write_text("") if not frames() else write(path, frames())
    if not frames() and words == ("cannot read", "Empty file"):
        missing = config_error(tmp_path, lambda raw: raw.update(test={"file": "nowhere.extxyz"}))
        assert "test.file: cannot read" in missing and "nowhere.extxyz" in missing
    message = config_error(tmp_path, lambda raw: raw.update(test={"file": str(path)}))
    assert "test.file" in message and str(path) in message
    for word in words:
        assert word in message, message


def test_test_file_with_labels_on_some_frames_only(tmp_path):
    from ionflow.platform.structures import labelled_copy

    frames = _zundel_frames(3)
    frames[1] = labelled_copy(frames[1], -100.0, [[0.0, 0.0, 0.0]] * 7)
    write(tmp_path / "mixed.extxyz", frames)
    message = config_error(tmp_path, lambda raw: raw.update(test={"file": "mixed.extxyz"}))
    assert "frame 1 has reference energy and forces but frame 0 has not" in message


def test_test_file_is_relative_to_the_campaign_file_and_may_carry_labels(tmp_path):
    from ionflow.platform.structures import labelled_copy

    (tmp_path / "data").mkdir()
    frames = [labelled_copy(a, -100.0 - k, [[0.1, 0.0, 0.0]] * 7) for k, a in enumerate(_zundel_frames(2))]
    write(tmp_path / "data" / "test.extxyz", frames)
    raw = copy.deepcopy(BASE) | {"test": {"file": "data/test.extxyz"}, "bootstrap": {"n_test": 0}}
    cfg = load_config(write_config(tmp_path, raw))
    given, labelled = cfg.test_structures()
    assert labelled and len(given) == 2
    assert [a.info["REF_energy"] for a in given] == [-100.0, -101.0]
    assert all(a.info["charge"] == 1 and a.info["multiplicity"] == 1 for a in given)  # the system's


def test_a_campaign_needs_a_test_set(tmp_path):
    message = config_error(tmp_path, lambda raw: raw.update(bootstrap={"n_test": 0}))
    assert "no test set" in message and "test.held_out_per_iteration" in message
    raw = copy.deepcopy(BASE) | {"bootstrap": {"n_test": 0}, "test": {"held_out_per_iteration": 2}}
    assert load_config(write_config(tmp_path, raw)).test.held_out_per_iteration == 2


def test_growth_conditions_are_checked(tmp_path):
    states = {"add_charge_states": [{"charge": 1, "multiplicity": 2}]}  # H5O2+ has an even electron count
    message = config_error(tmp_path, lambda raw: raw["explore"].update(walkers=4, **states))
    assert "explore.add_charge_states.0" in message and "multiplicity" in message
    own = {"add_charge_states": [{"charge": 1, "multiplicity": 1}]}
    assert "already" in config_error(tmp_path, lambda raw: raw["explore"].update(walkers=4, **own))
    few = {"add_temperatures_K": [400, 500], "add_charge_states": [{"charge": 0, "multiplicity": 2}]}
    message = config_error(tmp_path, lambda raw: raw["explore"].update(walkers=4, **few))
    assert "explore.walkers (4)" in message and "6" in message
    message = config_error(tmp_path, lambda raw: raw["explore"].update(add_temperatures_K=[-5]))
    assert "explore.add_temperatures_K.0" in message


def test_new_sections_at_their_defaults_keep_the_science_hash(tmp_path):
    plain = load_config(write_config(tmp_path, BASE))
    raw = copy.deepcopy(BASE) | {"test": {"held_out_per_iteration": 0}}
    raw["explore"] = dict(raw["explore"], add_temperatures_K=[], add_charge_states=[])
    assert load_config(write_config(tmp_path, raw)).science_hash() == plain.science_hash()
    raw["test"] = {"held_out_per_iteration": 1}
    assert load_config(write_config(tmp_path, raw)).science_hash() != plain.science_hash()
