"""``ionflow ui``: a read-only web dashboard over a campaign's provenance database.

A Starlette app (Starlette, Jinja2 and uvicorn come with Prefect). Every route is a GET; the
database is opened read-only (:func:`ionflow.db.session.read_only_engine`), so the dashboard can
never change a campaign. Stored strings are escaped by Jinja2's autoescape, and the data behind
charts travels as JSON inside ``<script type="application/json">`` with ``<`` escaped. Charts are
drawn by plotly.js, served from the installed ``plotly`` package: no page loads anything from
another host.

Pages (each a fixed number of queries, :mod:`ionflow.ui.data`): ``/`` campaigns,
``/campaign/{id}`` (``?iteration=N`` picks the selection shown), ``/model/{id}``,
``/structure/{id}``. JSON for the pages' scripts: ``/api/campaign/{id}/state`` (the live page
polls it), ``/api/model/{id}/parity`` (the model on its test set), ``/api/structure/{id}/atoms``
(positions, and the newest model's charges and force spreads). Downloads:
``/model/{id}/checkpoint.pt`` and ``/model/{id}/training-set.extxyz``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from markupsafe import Markup
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from ionflow.db import session_factory
from ionflow.db.models import Campaign
from ionflow.db.provenance import campaign_folder
from ionflow.db.session import read_only_engine, shown_url
from ionflow.ui import data, figures

HERE = Path(__file__).resolve().parent
#: Parity plots show at most this many force components (a random, fixed subset beyond).
MAX_FORCE_POINTS = 5000


def to_json(value: Any) -> Markup:
    """JSON safe to put inside a <script> element as it is: ``<``, ``>`` and ``&`` are escaped
    the JSON way, so no stored string can end the element or open a tag."""
    text = json.dumps(value, default=_default)
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    if isinstance(value, datetime):  # stored in UTC; whole seconds are enough to read
        return value.replace(microsecond=0).isoformat(sep=" ").replace("+00:00", "") + " UTC"
    return str(value)


class Dashboard:
    """The app's state: the database, the folder that relative paths resolve against (None: each
    campaign's recorded folder), and caches of computed model predictions."""

    def __init__(self, url: str, folder: Path | None = None) -> None:
        self.url = url
        self.folder = folder
        self.engine = read_only_engine(url)
        from ionflow.db.session import schema_problem

        if (problem := schema_problem(self.engine)) is not None:
            self.engine.dispose()
            raise ValueError(f"{shown_url(url)}: {problem}")
        self.sessions = session_factory(self.engine)
        with self.session() as s:
            self.only_campaign = s.scalar(select(func.count(Campaign.id))) <= 1
        self._lock = threading.Lock()

    @contextmanager
    def session(self):
        session = self.sessions()
        try:
            yield session
        finally:
            session.rollback()
            session.close()

    def campaign_folder(self, recorded: str) -> Path:
        return campaign_folder(self.folder, recorded, self.only_campaign)


def create_app(url: str, folder: Path | None = None) -> Starlette:
    """The dashboard over the database at ``url`` (read-only)."""
    board = Dashboard(url, folder)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["fmt"] = _fmt
    templates.env.filters["tojson_safe"] = to_json
    templates.env.globals["milli"] = lambda v: None if v is None else 1000 * v

    def page(name: str, request: Request, **context: Any) -> Response:
        return templates.TemplateResponse(request, name, context)

    def not_found(what: str) -> Response:
        return HTMLResponse(f"<h1>not found</h1><p>{_escape(what)}</p>", status_code=404)

    async def campaigns_page(request: Request) -> Response:
        with board.session() as s:
            rows = data.campaigns(s)
        return page("campaigns.html", request, campaigns=rows, database=shown_url(url))

    async def campaign_page(request: Request) -> Response:
        iteration = _int(request.query_params.get("iteration"))
        with board.session() as s:
            found = data.campaign(s, request.path_params["campaign_id"], iteration)
        if found is None:
            return not_found(f"campaign {request.path_params['campaign_id']}")
        shown = {
            "curve_labels": figures.learning_curve(found["curve"], "labels"),
            "curve_cpu": figures.learning_curve(found["curve"], "cpu"),
            "calibration": figures.calibration(found["calibration"]),
            "selection": figures.selection_histogram(found["selection"]) if found["selection"] else None,
        }
        return page("campaign.html", request, c=found, figures=shown)

    async def campaign_state(request: Request) -> Response:
        with board.session() as s:
            found = data.campaign_state(s, request.path_params["campaign_id"])
        return JSONResponse(found) if found is not None else JSONResponse({"error": "no such campaign"}, 404)

    async def model_page(request: Request) -> Response:
        with board.session() as s:
            found = data.model(s, request.path_params["model_id"])
        if found is None:
            return not_found(f"model {request.path_params['model_id']}")
        return page("model.html", request, m=found, figures={"lineage": figures.lineage_graph(found)})

    async def structure_page(request: Request) -> Response:
        with board.session() as s:
            found = data.structure(s, request.path_params["structure_id"], _int(request.query_params.get("campaign")))
        if found is None:
            return not_found(f"structure {request.path_params['structure_id']}")
        return page("structure.html", request, st=found)

    async def model_parity(request: Request) -> Response:
        found = board_parity(board, request.path_params["model_id"])
        return JSONResponse(found, status_code=200 if "error" not in found else 404)

    async def structure_atoms(request: Request) -> Response:
        found = board_atoms(board, request.path_params["structure_id"], _int(request.query_params.get("model")))
        return JSONResponse(found, status_code=200 if "error" not in found else 404)

    async def checkpoint(request: Request) -> Response:
        path, name = checkpoint_file(board, request.path_params["model_id"])
        if path is None:
            return PlainTextResponse(name, status_code=404)
        return FileResponse(path, filename=name, media_type="application/octet-stream")

    async def training_set(request: Request) -> Response:
        text, name = training_set_text(board, request.path_params["model_id"])
        if text is None:
            return PlainTextResponse(name, status_code=404)
        return Response(
            text, media_type="chemical/x-extxyz", headers={"Content-Disposition": f'attachment; filename="{name}"'}
        )

    async def plotly_js(request: Request) -> Response:
        return Response(_plotly(), media_type="application/javascript", headers={"Cache-Control": "max-age=86400"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ("ionflow.js", "ionflow.css"):
            return PlainTextResponse("not found", status_code=404)
        kind = "application/javascript" if name.endswith(".js") else "text/css"
        return Response((HERE / "static" / name).read_text(encoding="utf-8"), media_type=kind)

    routes = [
        Route("/", campaigns_page),
        Route("/campaign/{campaign_id:int}", campaign_page),
        Route("/model/{model_id:int}", model_page),
        Route("/structure/{structure_id:int}", structure_page),
        Route("/api/campaign/{campaign_id:int}/state", campaign_state),
        Route("/api/model/{model_id:int}/parity", model_parity),
        Route("/api/structure/{structure_id:int}/atoms", structure_atoms),
        Route("/model/{model_id:int}/checkpoint.pt", checkpoint),
        Route("/model/{model_id:int}/training-set.extxyz", training_set),
        Route("/static/plotly.min.js", plotly_js),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/static/{name}", static),
    ]

    async def timing(request: Request, call_next: Callable) -> Response:
        # server time of every response, in the standard header (the benchmark reads it)
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["Server-Timing"] = f"app;dur={1000 * (time.perf_counter() - start):.1f}"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"
        )
        return response

    app = Starlette(routes=routes, middleware=[Middleware(BaseHTTPMiddleware, dispatch=timing)])
    app.state.board = board
    return app


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.lstrip("-").isdigit() else None


def _escape(text: str) -> str:
    from markupsafe import escape

    return str(escape(text))


@lru_cache(maxsize=1)
def _plotly() -> bytes:
    return files("plotly").joinpath("package_data", "plotly.min.js").read_bytes()


# --- what needs the model: computed on request, cached -------------------------------------------


_CACHE: dict[tuple[str, str, int, int | None], dict[str, Any]] = {}


def _cached(board: Dashboard, kind: str, key: int, extra: int | None, compute: Callable[[], dict[str, Any]]):
    k = (board.url, kind, key, extra)
    with board._lock:
        if k not in _CACHE:
            _CACHE[k] = compute()
        return _CACHE[k]


def _model_file(board: Dashboard, model_id: int) -> tuple[Any, Path | None]:
    from ionflow.db.models import Campaign, Model

    with board.session() as s:
        row = s.get(Model, model_id)
        if row is None:
            return None, None
        folder = board.campaign_folder(s.get(Campaign, row.campaign_id).workdir)
        s.expunge(row)
    return row, folder / row.checkpoint_path


def checkpoint_file(board: Dashboard, model_id: int) -> tuple[Path | None, str]:
    row, path = _model_file(board, model_id)
    if row is None:
        return None, f"no model {model_id}"
    if not path.is_file():
        return None, f"the checkpoint {path} is not there (give ionflow ui the campaign folder if it moved)"
    return path, f"model-v{row.version}.pt"


def training_set_text(board: Dashboard, model_id: int) -> tuple[str | None, str]:
    """A model's training and validation labels as extxyz text (as ``ionflow export dataset``)."""
    import io

    from ase.io import write

    from ionflow.db.models import Campaign, Model
    from ionflow.db.objects import ObjectStore
    from ionflow.db.provenance import training_members
    from ionflow.db.records import labelled_atoms

    with board.session() as s:
        row = s.get(Model, model_id)
        if row is None:
            return None, f"no model {model_id}"
        store = ObjectStore(board.campaign_folder(s.get(Campaign, row.campaign_id).workdir))
        frames = []
        for calculation, structure, info in training_members(s, row):
            try:
                atoms = labelled_atoms(store, structure, calculation)
            except FileNotFoundError as exc:
                return None, str(exc)
            atoms.info.update({k: v for k, v in info.items() if v is not None}, model_version=row.version)
            frames.append(atoms)
        version = row.version
    out = io.StringIO()
    write(out, frames, format="extxyz")
    return out.getvalue(), f"training-set-v{version}.extxyz"


def board_parity(board: Dashboard, model_id: int) -> dict[str, Any]:
    """Predictions of a model on the test set it was evaluated on when trained, beside the labels:
    energies per atom, force components (a fixed subset beyond :data:`MAX_FORCE_POINTS`), and the
    predicted charges per element."""

    def compute() -> dict[str, Any]:
        import numpy as np

        from ionflow.db.models import Campaign, Model
        from ionflow.db.objects import ObjectStore
        from ionflow.db.provenance import test_members
        from ionflow.db.records import labelled_atoms
        from ionflow.platform.evaluation import compare, reference_charges
        from ionflow.platform.model import load_model

        with board.session() as s:
            row = s.get(Model, model_id)
            if row is None:
                return {"error": f"no model {model_id}"}
            folder = board.campaign_folder(s.get(Campaign, row.campaign_id).workdir)
            store = ObjectStore(folder)
            try:
                frames = [labelled_atoms(store, st, calc) for calc, st, _ in test_members(s, row)]
            except FileNotFoundError as exc:
                return {"error": str(exc)}
            path = folder / row.checkpoint_path
        if not frames:
            return {"error": "no labelled test structures for this model"}
        if not path.is_file():
            return {"error": f"the checkpoint {path} is not there"}
        c = compare(load_model(path), frames)
        forces = np.stack([c.ref_forces.ravel(), c.forces.ravel()], 1)
        if len(forces) > MAX_FORCE_POINTS:
            forces = forces[np.random.default_rng(0).choice(len(forces), MAX_FORCE_POINTS, replace=False)]
        from ase.data import chemical_symbols

        with_charges = [a for a in frames if reference_charges(a) is not None]
        charges: dict[str, list[float]] = {}
        if len(c.charges):
            numbers = np.concatenate([a.numbers for a in with_charges])
            for z in sorted(set(numbers.tolist())):
                charges[chemical_symbols[z]] = c.charges[numbers == z].astype(float).tolist()
        energy_ref, energy_pred = (c.ref_energy / c.n_atoms).tolist(), (c.energy / c.n_atoms).astype(float).tolist()
        forces_ref, forces_pred = forces[:, 0].astype(float).tolist(), forces[:, 1].astype(float).tolist()
        return {
            "figures": {
                "energy": figures.parity(energy_ref, energy_pred, "energy per atom", "eV/atom"),
                "forces": figures.parity(forces_ref, forces_pred, "force components", "eV/Å"),
                "charges": figures.charges_by_element(charges),
            },
            "n_structures": len(frames),
            "energy_ref_eV_per_atom": energy_ref,
            "energy_pred_eV_per_atom": energy_pred,
            "forces_ref_eV_per_A": forces_ref,
            "forces_pred_eV_per_A": forces_pred,
            "charges_e": charges,
        }

    return _cached(board, "parity", model_id, None, compute)


def board_atoms(board: Dashboard, structure_id: int, model_id: int | None) -> dict[str, Any]:
    """A structure's atoms for the 3D view, and a model's predicted charges and force spreads on
    them (``model_id``, default the newest model of the structure's first campaign)."""

    def compute() -> dict[str, Any]:
        from ase.data import chemical_symbols, covalent_radii
        from sqlalchemy import select

        from ionflow.db.models import Campaign, CampaignStructure, Model, Structure
        from ionflow.db.objects import ObjectStore

        with board.session() as s:
            row = s.get(Structure, structure_id)
            if row is None:
                return {"error": f"no structure {structure_id}"}
            member = s.scalar(select(CampaignStructure).where(CampaignStructure.structure_id == structure_id).limit(1))
            campaign = s.get(Campaign, member.campaign_id) if member is not None else None
            if campaign is None:
                return {"error": f"structure {structure_id} belongs to no campaign"}
            folder = board.campaign_folder(campaign.workdir)
            chosen = (
                s.get(Model, model_id)
                if model_id is not None
                else s.scalar(
                    select(Model).where(Model.campaign_id == campaign.id).order_by(Model.version.desc()).limit(1)
                )
            )
            model_path = folder / chosen.checkpoint_path if chosen is not None else None
            version = chosen.version if chosen is not None else None
            relpath = row.path
        store = ObjectStore(folder)
        try:
            atoms = store.get_structure(relpath)
        except FileNotFoundError as exc:
            return {"error": str(exc)}
        out: dict[str, Any] = {
            "symbols": [chemical_symbols[z] for z in atoms.numbers],
            "positions_A": atoms.positions.tolist(),
            "radii_A": [float(covalent_radii[z]) for z in atoms.numbers],
            "model_version": None,
        }
        if model_path is not None and model_path.is_file():
            from ionflow.platform.model import load_calculator

            atoms.calc = load_calculator(model_path)
            atoms.get_potential_energy()
            out.update(
                model_version=version,
                charges_e=atoms.calc.results["charges"].tolist(),
                force_spread_eV_per_A=atoms.calc.results["forces_uncertainty"].tolist(),
            )
        return out

    return _cached(board, "atoms", structure_id, model_id, compute)
