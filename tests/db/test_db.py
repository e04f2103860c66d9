"""Database layer: migrations, constraints, object store and queries.

Runs on a SQLite file per test; set IONFLOW_TEST_POSTGRES_URL (a sync driver URL,
e.g. ``postgresql+psycopg://user@host/db``) to run every database test on
PostgreSQL too, each in a fresh schema that is dropped afterwards.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from sqlalchemy import Engine, event, inspect, select, text
from sqlalchemy.exc import IntegrityError

from ionflow.db import (
    Base,
    Calculation,
    Campaign,
    CampaignStructure,
    Iteration,
    MDRun,
    Model,
    ObjectStore,
    SelectionDecision,
    Structure,
    TrainingMember,
    find_calculation,
    iteration_table,
    make_engine,
    model_lineage,
    session_factory,
    session_scope,
    sqlite_url,
    upgrade,
)
from ionflow.db.records import add_structure, adopt_calculation, labelled_set, record_calculation
from ionflow.dft_adapters.base import LabelResult
from ionflow.platform.structures import structure_hash

TABLES = {
    "campaign",
    "iteration",
    "structure",
    "campaign_structure",
    "calculation",
    "model",
    "model_training_member",
    "md_run",
    "selection_decision",
    "prefect_run",
    "remote_job",
}


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    """An engine on a migrated database."""
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _structure(
    session, store: ObjectStore, atoms: Atoms, campaign: Campaign | None = None, origin: str = "initial", **links
) -> Structure:
    """A structure row; with ``campaign``, also its membership (``origin``, ``iteration``, ``md_run``)."""
    row = Structure(
        hash=structure_hash(atoms),
        formula=atoms.get_chemical_formula(),
        n_atoms=len(atoms),
        charge=int(atoms.info.get("charge", 0)),
        multiplicity=int(atoms.info.get("multiplicity", 1)),
        path=store.put_structure(atoms),
    )
    session.add(row)
    if campaign is not None:
        session.add(CampaignStructure(campaign=campaign, structure=row, origin=origin, **links))
    session.flush()
    return row


def _calculation(session, structure: Structure, status: str = "ok", **links) -> Calculation:
    row = Calculation(
        structure=structure,
        adapter="tblite",
        code_version="0.8.0",
        settings_hash="a" * 64,
        settings={"method": "GFN2-xTB"},
        status=status,
        energy=-10.0 if status == "ok" else None,
        wall_time_s=1.5,
        error=None if status == "ok" else "SCF did not converge",
        **links,
    )
    session.add(row)
    session.flush()
    return row


def _campaign(session, name: str = "water") -> Campaign:
    campaign = Campaign(name=name, config={"name": name}, config_hash="c" * 64, workdir=f"/runs/{name}")
    session.add(campaign)
    session.flush()
    return campaign


# -- migrations ---------------------------------------------------------------


def test_upgrade_creates_all_tables(engine: Engine) -> None:
    assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
    assert set(Base.metadata.tables) == TABLES


def test_upgrade_twice_is_a_noop(url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    with session_scope(session_factory(engine)) as session:
        _campaign(session)
    upgrade(url)
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0004"
        assert conn.execute(select(Campaign.name)).scalars().all() == ["water"]
    engine.dispose()


def test_upgrade_from_0001_keeps_calculations_and_adds_cpu_time(url: str) -> None:
    upgrade(url, "0001")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO structure (hash, formula, n_atoms, charge, multiplicity, path, created_at) "
                "VALUES ('h', 'H2O', 3, 0, 1, 'structures/h.extxyz', CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO calculation (structure_id, adapter, code_version, settings_hash, settings, status, "
                "wall_time_s, created_at) VALUES (1, 'pyscf', '2', 's', '{}', 'ok', 1.5, CURRENT_TIMESTAMP)"
            )
        )
    assert "cpu_time_s" not in {c["name"] for c in inspect(engine).get_columns("calculation")}
    upgrade(url)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT wall_time_s, cpu_time_s FROM calculation")).one()
    assert tuple(row) == (1.5, None)
    engine.dispose()


def test_migration_matches_models(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_upgrade_leaves_logging_alone(url: str) -> None:
    app_logger = logging.getLogger("ionflow.test.app")
    root_handlers = list(logging.getLogger().handlers)
    upgrade(url)
    assert not app_logger.disabled  # logging.config.fileConfig would have disabled it
    assert logging.getLogger().handlers == root_handlers


def test_concurrent_upgrades_on_sqlite(tmp_path) -> None:
    """Workers starting at once (processes and threads) all end on the same schema."""
    url = sqlite_url(tmp_path / "ionflow.db")
    # each process imports, says "ready", and migrates when told "go", so the migrations overlap
    script = f"from ionflow.db import upgrade; print('ready', flush=True); input(); upgrade({url!r})"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for worker in workers:
        assert worker.stdout.readline().strip() == "ready", worker.stderr.read()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            upgrade(url)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    for worker in workers:
        _, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr
    assert errors == []
    engine = make_engine(url)
    assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
    engine.dispose()


# -- constraints ----------------------------------------------------------------


def test_foreign_keys_are_enforced(engine: Engine) -> None:
    with pytest.raises(IntegrityError), session_scope(session_factory(engine)) as session:
        session.add(
            Calculation(
                structure_id=12345,
                adapter="tblite",
                code_version="0.8.0",
                settings_hash="a" * 64,
                settings={},
                status="ok",
                wall_time_s=0.0,
            )
        )


def test_a_calculation_is_never_repeated(engine: Engine, tmp_path) -> None:
    store = ObjectStore(tmp_path / "objects")
    sessions = session_factory(engine)
    with session_scope(sessions) as session:
        water = _structure(session, store, molecule("H2O"))
        first = _calculation(session, water, status="failed")
    with session_scope(sessions) as session:
        found = find_calculation(session, water.hash, "a" * 64)
        assert found is not None and found.id == first.id and found.status == "failed"
        assert find_calculation(session, water.hash, "b" * 64) is None
    with pytest.raises(IntegrityError), session_scope(sessions) as session:
        _calculation(session, session.get(Structure, water.id))


def test_timestamps_are_utc_aware(engine: Engine) -> None:
    sessions = session_factory(engine)
    with session_scope(sessions) as session:
        campaign_id = _campaign(session).id
    with session_scope(sessions) as session:
        created = session.get(Campaign, campaign_id).created_at
    assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0


def test_session_scope_rolls_back_on_error(engine: Engine) -> None:
    sessions = session_factory(engine)
    with pytest.raises(RuntimeError), session_scope(sessions) as session:
        _campaign(session)
        raise RuntimeError("boom")
    with session_scope(sessions) as session:
        assert session.scalars(select(Campaign)).all() == []


# -- object store -----------------------------------------------------------------


def test_object_store_round_trips_a_charged_structure(tmp_path) -> None:
    store = ObjectStore(tmp_path / "objects")
    atoms = molecule("CH3")  # the methyl anion: 10 electrons, a singlet
    atoms.positions[0, 0] = 0.1234565000001  # 1e-13 Å from a rounding boundary of the hash
    atoms.info.update(charge=-1, multiplicity=1, REF_energy=-3.0)
    atoms.calc = SinglePointCalculator(atoms, energy=-3.0)

    relpath = store.put_structure(atoms)
    back = store.get_structure(relpath)

    assert relpath == f"structures/{structure_hash(atoms)[:2]}/{structure_hash(atoms)}.extxyz"
    assert structure_hash(back) == structure_hash(atoms)
    assert back.info["charge"] == -1 and type(back.info["charge"]) is int
    assert back.info["multiplicity"] == 1 and type(back.info["multiplicity"]) is int
    assert back.get_chemical_symbols() == atoms.get_chemical_symbols()
    np.testing.assert_allclose(back.positions, atoms.positions, rtol=0, atol=5e-7)
    np.testing.assert_array_equal(back.positions, np.round(atoms.positions, 6))
    assert back.calc is None and "REF_energy" not in back.info
    # idempotent: the same structure lands on the same single file
    assert store.put_structure(back) == relpath
    assert len(list((tmp_path / "objects").rglob("*.extxyz"))) == 1
    assert not list((tmp_path / "objects").rglob("*.tmp"))


def test_object_store_round_trips_arrays_and_files(tmp_path) -> None:
    store = ObjectStore(tmp_path / "objects")
    rng = np.random.default_rng(0)
    arrays = {"forces": rng.normal(size=(5, 3)), "charges": rng.normal(size=5), "energy": np.array(-1.5)}

    relpath, sha = store.put_arrays(arrays)
    back = store.get_arrays(relpath)
    assert relpath == f"arrays/{sha[:2]}/{sha}.npz"
    assert back.keys() == arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value)
        assert back[key].dtype == value.dtype
    assert store.put_arrays(dict(reversed(arrays.items()))) == (relpath, sha)
    assert store.verify(relpath, sha)
    with pytest.raises(ValueError):
        store.put_arrays({"bad": np.array([{"a": 1}], dtype=object)})

    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    relpath, sha = store.put_file(checkpoint, "checkpoints")
    assert relpath == f"checkpoints/{sha}.pt"
    assert store.verify(relpath, sha)
    assert not store.verify(relpath, "0" * 64)
    with pytest.raises(ValueError):
        store.path("../outside")


# -- queries --------------------------------------------------------------------------


def _build_campaign(session, store: ObjectStore) -> dict[str, int]:
    """Two iterations of a small water campaign, plus an unrelated campaign.

    initial: s1, s2 labelled (no iteration)
    it0: MD run r0 (no model) from s1 gives s3, s4, s5; s3, s4 chosen, s5 rejected;
         s3 labelled ok, s4 failed; model v1 trained on s1, s2 (train) and s3 (valid)
    it1: MD run r1 (model v1) from s3 gives s6; s6 chosen and labelled;
         model v2 (parent v1) trained on s1, s2, s3, s6
    """
    campaign = _campaign(session)
    base = molecule("H2O")
    frames = [base.copy() for _ in range(6)]
    for k, frame in enumerate(frames):
        frame.positions[0, 2] += 0.01 * (k + 1)

    s1 = _structure(session, store, frames[0], origin="initial", campaign=campaign)
    s2 = _structure(session, store, frames[1], origin="initial", campaign=campaign)
    c1, c2 = _calculation(session, s1), _calculation(session, s2)

    it0 = Iteration(campaign=campaign, index=0, status="done", metrics={"force_rmse": 0.2})
    it1 = Iteration(campaign=campaign, index=1, status="trained")
    session.add_all([it0, it1])
    session.flush()

    r0 = MDRun(
        campaign_id=campaign.id,
        iteration=it0,
        start_structure=s1,
        walker=0,
        temperature_K=300.0,
        timestep_fs=0.5,
        n_steps_requested=100,
        n_steps_done=40,
        stop_reason="uncertainty",
    )
    session.add(r0)
    session.flush()
    s3, s4, s5 = (
        _structure(session, store, frames[k], origin="md", campaign=campaign, iteration=it0, md_run=r0)
        for k in (2, 3, 4)
    )
    for s, chosen in ((s3, True), (s4, True), (s5, False)):
        session.add(
            SelectionDecision(
                iteration=it0,
                structure=s,
                md_run=r0,
                score=0.3 if chosen else 0.05,
                threshold=0.1,
                chosen=chosen,
                reason_code="uncertain" if chosen else "trusted",
                reason="above threshold" if chosen else "below threshold",
            )
        )
    c3 = _calculation(session, s3, iteration=it0)
    _calculation(session, s4, status="failed", iteration=it0)
    m1 = Model(
        campaign=campaign,
        iteration=it0,
        version=1,
        kind="mace-charges",
        hyperparameters={"r_max": 5.0},
        checkpoint_path="checkpoints/v1.pt",
        checkpoint_sha256="1" * 64,
    )
    m1.training_members = [
        TrainingMember(calculation=c1, split="train"),
        TrainingMember(calculation=c2, split="train"),
        TrainingMember(calculation=c3, split="valid"),
    ]
    session.add(m1)
    session.flush()

    r1 = MDRun(
        campaign_id=campaign.id,
        iteration=it1,
        model=m1,
        start_structure=s3,
        walker=0,
        temperature_K=300.0,
        timestep_fs=0.5,
        n_steps_requested=100,
        n_steps_done=100,
        stop_reason="done",
    )
    session.add(r1)
    session.flush()
    s6 = _structure(session, store, frames[5], origin="md", campaign=campaign, iteration=it1, md_run=r1)
    session.add(
        SelectionDecision(
            iteration=it1,
            structure=s6,
            md_run=r1,
            score=0.2,
            threshold=0.1,
            chosen=True,
            reason_code="uncertain",
            reason="above threshold",
        )
    )
    c6 = _calculation(session, s6, iteration=it1)
    c6.cpu_time_s = 0.25  # known CPU time; the others count their wall time (1.5 s)
    m2 = Model(
        campaign=campaign,
        iteration=it1,
        version=2,
        parent=m1,
        kind="mace-charges",
        hyperparameters={},
        checkpoint_path="checkpoints/v2.pt",
        checkpoint_sha256="2" * 64,
    )
    m2.training_members = [TrainingMember(calculation=c, split="train") for c in (c1, c2, c3, c6)]
    session.add(m2)

    # another campaign's labels must not leak into this one's counts, nor its MD runs
    # into this one's lineage, although it sampled s3 as well
    other = _campaign(session, "other")
    _calculation(session, _structure(session, store, molecule("NH3"), origin="initial", campaign=other))
    other_it = Iteration(campaign=other, index=0, status="done")
    r_other = MDRun(
        campaign=other,
        iteration=other_it,
        start_structure=s1,
        walker=0,
        temperature_K=300.0,
        timestep_fs=0.5,
        n_steps_requested=100,
        n_steps_done=100,
        stop_reason="done",
    )
    session.add(CampaignStructure(campaign=other, structure=s3, iteration=other_it, md_run=r_other, origin="md"))
    session.add(
        SelectionDecision(
            iteration=other_it,
            structure=s3,
            md_run=r_other,
            score=0.05,
            threshold=0.1,
            chosen=False,
            reason_code="trusted",
            reason="below threshold",
        )
    )
    session.flush()
    return {
        "campaign": campaign.id,
        "m1": m1.id,
        "m2": m2.id,
        "r0": r0.id,
        "r1": r1.id,
        "s1": s1.id,
        "s2": s2.id,
        "s3": s3.id,
        "s6": s6.id,
    }


def test_iteration_table_counts(engine: Engine, tmp_path) -> None:
    sessions = session_factory(engine)
    with session_scope(sessions) as session:
        ids = _build_campaign(session, ObjectStore(tmp_path / "objects"))
    with session_scope(sessions) as session:
        table = iteration_table(session, ids["campaign"])
    assert table == [
        {
            "index": 0,
            "status": "done",
            "n_labels": 3,
            "n_failed": 1,
            "n_selected": 2,
            "n_md_runs": 1,
            "model_version": 1,
            "n_training_labels": 3,
            "reference_cpu_s": 3.0,  # s3 and the failed s4, computed in iteration 0: wall time, CPU unknown
            "metrics": {"force_rmse": 0.2},
            "model_metrics": {},
        },
        {
            "index": 1,
            "status": "trained",
            "n_labels": 4,
            "n_failed": 0,
            "n_selected": 1,
            "n_md_runs": 1,
            "model_version": 2,
            "n_training_labels": 4,
            "reference_cpu_s": 3.25,  # + s6's CPU time
            "metrics": {},
            "model_metrics": {},
        },
    ]


def test_model_lineage_in_few_queries(engine: Engine, tmp_path) -> None:
    sessions = session_factory(engine)
    with session_scope(sessions) as session:
        ids = _build_campaign(session, ObjectStore(tmp_path / "objects"))

    statements: list[str] = []
    # data queries only (PostgreSQL also gets one SET LOCAL of a planner cost)
    event.listen(
        engine, "before_cursor_execute", lambda *args: None if args[2].startswith("SET") else statements.append(args[2])
    )
    with session_scope(sessions) as session:
        lineage = model_lineage(session, ids["m2"])
        n_queries = len(statements)
        splits = {m.calculation.structure.id: m.split for m in lineage["members"]}
        assert len(statements) == n_queries  # members come with calculation and structure loaded
    assert n_queries <= 5

    assert lineage["model"].version == 2
    assert [m.id for m in lineage["ancestors"]] == [ids["m1"]]
    assert splits == dict.fromkeys((ids["s1"], ids["s2"], ids["s3"], ids["s6"]), "train")
    assert {s.id for s in lineage["structures"]} == {ids["s1"], ids["s2"], ids["s3"], ids["s6"]}
    assert all(c.status == "ok" for c in lineage["calculations"])
    assert [r.id for r in lineage["md_runs"]] == [ids["r0"], ids["r1"]]
    assert {d.structure_id for d in lineage["decisions"]} == {ids["s3"], ids["s6"]}
    assert all(d.chosen for d in lineage["decisions"])

    with session_scope(sessions) as session:
        first = model_lineage(session, ids["m1"])
    assert first["ancestors"] == [] and len(first["members"]) == 3
    assert [r.id for r in first["md_runs"]] == [ids["r0"]]
    with pytest.raises(LookupError), session_scope(sessions) as session:
        model_lineage(session, 10_000)


# -- campaigns sharing a database ------------------------------------------------------


def _label(atoms: Atoms, energy: float = -10.0) -> LabelResult:
    forces = np.linspace(-0.5, 0.5, 3 * len(atoms)).reshape(-1, 3)
    return LabelResult(
        status="ok",
        code="tblite",
        code_version="0.8.0",
        settings_hash="a" * 64,
        wall_time_s=1.0,
        energy=energy,
        forces=forces,
    )


def test_a_structure_is_a_member_of_two_campaigns_with_different_origins(engine: Engine, tmp_path) -> None:
    """One structure, one calculation: campaign A trains on it, campaign B tests on it."""
    water, ammonia = molecule("H2O"), molecule("NH3")
    sessions = session_factory(engine)
    stores = {name: ObjectStore(tmp_path / name) for name in ("a", "b")}
    with session_scope(sessions) as session:
        a, b = _campaign(session, "a"), _campaign(session, "b")
        a.workdir, b.workdir = str(stores["a"].root), str(stores["b"].root)
        a0, b0 = Iteration(campaign=a, index=0), Iteration(campaign=b, index=0)
        b1 = Iteration(campaign=b, index=1)
        session.add_all([a0, b0, b1])
        session.flush()
        in_a = add_structure(session, stores["a"], water, "initial", a.id, iteration_id=a0.id)
        record_calculation(session, stores["a"], in_a, _label(water), "tblite", {}, a0.id)
        add_structure(session, stores["a"], ammonia, "test", a.id, iteration_id=a0.id)
        # B meets the same water later, in its own iteration, as a test structure
        in_b = add_structure(session, stores["b"], water, "test", b.id, iteration_id=b1.id)
        # a second meeting does not change why the structure is in the campaign
        again = add_structure(session, stores["a"], water, "md", a.id, iteration_id=a0.id)
        ids = {"a": a.id, "b": b.id, "a0": a0.id, "b1": b1.id}

    assert in_a.id == in_b.id == again.id
    # B's store holds the structure file too, at the same content address
    assert stores["b"].get_structure(in_b.path).get_chemical_formula() == "H2O"
    with session_scope(sessions) as session:
        assert len(session.scalars(select(Structure)).all()) == 2
        members = session.scalars(
            select(CampaignStructure).where(CampaignStructure.structure_id == in_a.id).order_by(CampaignStructure.id)
        ).all()
        assert [(m.campaign_id, m.origin, m.iteration_id) for m in members] == [
            (ids["a"], "initial", ids["a0"]),
            (ids["b"], "test", ids["b1"]),
        ]
        structure = session.get(Structure, in_a.id)
        assert {m.campaign.name for m in structure.memberships} == {"a", "b"}

        # each campaign sees the one calculation in its own role
        def hashes(campaign: str, store: str, test: bool) -> list[str]:
            found = labelled_set(session, stores[store], ids[campaign], "a" * 64, test=test)
            return [atoms.info["structure_hash"] for _, atoms in found]

        assert hashes("a", "a", test=False) == [in_a.hash]
        assert hashes("a", "a", test=True) == []  # ammonia is A's test structure, but unlabelled
        adopt_calculation(session, stores["b"], session.scalar(select(Calculation)))
        assert hashes("b", "b", test=True) == [in_a.hash]
        assert hashes("b", "b", test=False) == []

        # B's table counts A's label from the iteration that brought it into B
        assert [row["n_labels"] for row in iteration_table(session, ids["b"])] == [0, 1]
        assert [row["n_labels"] for row in iteration_table(session, ids["a"])] == [1]
        assert [row["n_failed"] for row in iteration_table(session, ids["b"])] == [0, 0]

    # a structure is a member of a campaign at most once
    with pytest.raises(IntegrityError), session_scope(sessions) as session:
        session.add(CampaignStructure(campaign_id=ids["a"], structure_id=in_a.id, origin="user"))


def test_adopting_a_calculation_copies_and_checks_its_results(engine: Engine, tmp_path) -> None:
    water = molecule("H2O")
    sessions = session_factory(engine)
    home, other, elsewhere = (ObjectStore(tmp_path / name) for name in ("home", "other", "elsewhere"))
    with session_scope(sessions) as session:
        computed_by = _campaign(session, "home")
        computed_by.workdir = str(home.root)
        it = Iteration(campaign=computed_by, index=0)
        session.add(it)
        session.flush()
        structure = add_structure(session, home, water, "initial", computed_by.id, iteration_id=it.id)
        calc = record_calculation(session, home, structure, _label(water), "tblite", {}, it.id)

        adopt_calculation(session, other, calc)
        assert other.verify(calc.results_path, calc.results_sha256)
        np.testing.assert_array_equal(other.get_arrays(calc.results_path)["forces"], _label(water).forces)
        adopt_calculation(session, other, calc)  # idempotent

        home.path(calc.results_path).unlink()  # the computing campaign's folder lost it
        with pytest.raises(FileNotFoundError, match="will not be computed again"):
            adopt_calculation(session, elsewhere, calc)


def test_a_candidate_labelled_elsewhere_is_a_label_once_chosen(engine: Engine, tmp_path) -> None:
    """An MD frame that campaign A chose and labelled is only a candidate in campaign B,
    which sampled it too, until B chooses it (and reuses A's calculation)."""
    frame = molecule("H2O")
    sessions = session_factory(engine)
    store = ObjectStore(tmp_path / "objects")
    with session_scope(sessions) as session:
        a, b = _campaign(session, "a"), _campaign(session, "b")
        a1, b0, b1 = Iteration(campaign=a, index=1), Iteration(campaign=b, index=0), Iteration(campaign=b, index=1)
        session.add_all([a1, b0, b1])
        session.flush()
        x = add_structure(session, store, frame, "md", a.id, iteration_id=a1.id)
        session.add(
            SelectionDecision(
                iteration=a1, structure=x, score=0.3, threshold=0.1, chosen=True, reason_code="uncertain", reason="up"
            )
        )
        record_calculation(session, store, x, _label(frame), "tblite", {}, a1.id)
        add_structure(session, store, frame, "md", b.id, iteration_id=b1.id)
        ids = {"a": a.id, "b": b.id, "b1": b1.id}

    def pool(session, campaign: str) -> int:
        return len(labelled_set(session, store, ids[campaign], "a" * 64, test=False))

    with session_scope(sessions) as session:
        assert (pool(session, "a"), pool(session, "b")) == (1, 0)
        assert [row["n_labels"] for row in iteration_table(session, ids["b"])] == [0, 0]
        session.add(
            SelectionDecision(
                iteration_id=ids["b1"],
                structure_id=x.id,
                score=0.3,
                threshold=0.1,
                chosen=True,
                reason_code="uncertain",
                reason="up",
            )
        )
    with session_scope(sessions) as session:
        assert pool(session, "b") == 1
        assert [row["n_labels"] for row in iteration_table(session, ids["b"])] == [0, 1]
