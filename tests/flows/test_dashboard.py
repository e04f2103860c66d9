"""The dashboard in a real browser: Debian's Chromium driven by playwright against a real
``ionflow ui`` process on a real campaign's database (a copy, so that a test can rename the
campaign and make it look as if it were running).

Every page renders, shows the database's numbers, draws its charts, logs no console error and
requests nothing from another host; stored strings are escaped; the app has no write endpoint and
never writes; a running campaign's page refreshes itself. A screenshot of each page is kept in
``test-artifacts/`` (or ``$IONFLOW_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import select

from ionflow.db import Iteration, Model, SelectionDecision, session_scope

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("IONFLOW_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
XSS = "<script>window.__pwned = 1</script>"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(finished_campaign, tmp_path_factory):
    """``ionflow ui`` on a copy of the finished campaign's folder, whose campaign is renamed to
    carry a script tag; yields (base URL, folder, original context)."""
    folder = tmp_path_factory.mktemp("dashboard") / "campaign"
    shutil.copytree(finished_campaign["ctx"].folder, folder)
    with sqlite3.connect(folder / "ionflow.db") as db:
        db.execute("UPDATE campaign SET name = ?", (f"tiny {XSS}",))
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "ionflow.cli", "ui", str(folder), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(base + "/", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"ionflow ui did not start: {server.stdout.read()}")
            time.sleep(0.3)
    yield base, folder, finished_campaign["ctx"]
    server.terminate()
    server.wait(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield instance
        instance.close()


def visit(browser, url: str, shot: str, wait_for: str | None = None):
    """Open ``url``; return (page, console errors, hosts asked). Keeps a screenshot."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors: list[str] = []
    hosts: set[str] = set()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: hosts.add(r.url.split("/")[2]))
    response = page.goto(url)
    assert response.status == 200, (url, response.status)
    page.wait_for_load_state("networkidle")
    if wait_for:
        page.wait_for_selector(wait_for, state="attached", timeout=60_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"dashboard-{shot}.png", full_page=True)
    return page, errors, hosts


def cells(page, table: str, key: str) -> list[str]:
    return page.locator(f"#{table} td[data-key={key}]").all_inner_texts()


def test_every_page_renders_the_database_s_numbers(served, browser):
    base, folder, ctx = served
    fingerprint = hashlib.sha256((folder / "ionflow.db").read_bytes()).hexdigest()
    with session_scope(ctx.sessions) as s:
        models = s.scalars(select(Model).order_by(Model.version)).all()
        metrics = {m.version: dict(m.metrics) for m in models}
        ids = {m.version: m.id for m in models}
        chosen = s.scalars(
            select(SelectionDecision).where(SelectionDecision.chosen.is_(True)).order_by(SelectionDecision.id)
        ).first()
        chosen_id, chosen_reason = chosen.structure_id, chosen.reason_code
        n_iterations = len(s.scalars(select(Iteration)).all())

    page, errors, hosts = visit(browser, base + "/", "campaigns")
    assert cells(page, "campaigns", "iterations") == [str(n_iterations)]
    latest = metrics[max(metrics)]
    assert cells(page, "campaigns", "test_forces") == [f"{latest['current_test_forces_rmse_eV_per_A']:.4f}"]
    assert XSS in page.locator("#campaigns").inner_text()  # shown as text ...
    assert page.evaluate("window.__pwned") is None  # ... never run
    seen = [(errors, hosts)]

    page, errors, hosts = visit(browser, base + "/campaign/1", "campaign")
    forces = cells(page, "iterations", "forces")
    assert forces == [f"{metrics[v]['current_test_forces_rmse_eV_per_A']:.4f}" for v in sorted(metrics)]
    assert int(page.locator("[data-figure=fig-curve-labels]").get_attribute("data-drawn")) == 2
    for chart in ("fig-curve-labels", "fig-curve-cpu", "fig-calibration", "fig-selection"):
        assert page.locator(f"[data-figure={chart}] svg.main-svg").count() >= 1, chart
    assert page.locator("#reasons").inner_text().count("uncertain") == 1
    assert page.evaluate("window.__pwned") is None
    seen.append((errors, hosts))

    page, errors, hosts = visit(
        browser, base + f"/model/{ids[2]}", "model", wait_for="#chart-parity-forces svg.main-svg"
    )
    row = page.locator("#errors tr[data-set=test] td").all_inner_texts()
    assert row[1] == str(metrics[2]["test_n_structures"]) and row[3] == f"{metrics[2]['test_forces_rmse_eV_per_A']:.4f}"
    assert page.locator("#chart-parity-energy svg.main-svg").count() >= 1
    assert page.locator("#chart-charges svg.main-svg").count() >= 1  # the electrostatic model's charges
    assert "v0" in page.locator("[data-figure=fig-lineage]").inner_text()
    seen.append((errors, hosts))

    page, errors, hosts = visit(
        browser,
        base + f"/structure/{chosen_id}?campaign=1",
        "structure",
        wait_for="#chart-atoms[data-drawn] canvas",
    )
    assert chosen_reason in page.locator("#decisions").inner_text()
    step = page.locator("#memberships td[data-key=md_step]").first.inner_text()
    assert int(step) > 0 and int(step) % 5 == 0
    page.select_option("#colour-by", "charges_e")
    page.wait_for_timeout(500)
    assert page.locator("#atoms-note").inner_text().startswith("(predicted by model v")
    seen.append((errors, hosts))

    for errors, hosts in seen:
        assert errors == []
        assert hosts == {base.split("/")[2]}  # nothing left 127.0.0.1
    assert hashlib.sha256((folder / "ionflow.db").read_bytes()).hexdigest() == fingerprint


def test_downloads_and_no_write_endpoint(served):
    base, folder, ctx = served
    with session_scope(ctx.sessions) as s:
        model = s.scalars(select(Model).where(Model.version == 1)).one()
        model_id, sha, n_members = model.id, model.checkpoint_sha256, len(model.training_members)
    body = urllib.request.urlopen(f"{base}/model/{model_id}/checkpoint.pt").read()
    assert hashlib.sha256(body).hexdigest() == sha
    text = urllib.request.urlopen(f"{base}/model/{model_id}/training-set.extxyz").read().decode()
    assert text.count("Properties=") == n_members
    for method in ("POST", "PUT", "DELETE"):
        request = urllib.request.Request(base + "/campaign/1", method=method, data=b"")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request)
        assert refused.value.code == 405
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(base + "/model/999")
    assert missing.value.code == 404


def test_a_running_campaign_s_page_refreshes_itself(served, browser):
    base, folder, _ = served
    with sqlite3.connect(folder / "ionflow.db") as db:
        db.execute("UPDATE campaign SET status = 'running'")
    try:
        page, errors, _ = visit(browser, base + "/campaign/1", "campaign-live")
        assert page.locator("#status").inner_text() == "running"
        page.evaluate("window.__before_reload = true")
        with sqlite3.connect(folder / "ionflow.db") as db:  # what a campaign's next step does
            db.execute("UPDATE campaign SET status = 'finished'")
        from playwright.sync_api import Error

        deadline = time.monotonic() + 30
        while True:  # the page polls every 3 s, then reloads
            try:
                if not page.evaluate("window.__before_reload === true"):
                    break
            except Error:  # asked while the page was reloading
                pass
            assert time.monotonic() < deadline, "the page did not refresh itself"
            page.wait_for_timeout(250)
        page.wait_for_selector("#status")
        assert page.locator("#status").inner_text() == "finished" and errors == []
    finally:
        with sqlite3.connect(folder / "ionflow.db") as db:
            db.execute("UPDATE campaign SET status = 'finished'")


def test_prefect_shows_each_iteration_s_report_and_a_link_to_the_dashboard(finished_campaign):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["tiny-iteration-2-report", "tiny-dashboard"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    reports = [a for a in found if a.key == keys[0]]
    links = [a for a in found if a.key == keys[1]]
    assert reports and all(a.type == "markdown" for a in reports)
    assert any(a.data.count("](data:image/png;base64,") == 2 for a in reports)  # learning curve, calibration
    # Prefect keeps a link artifact as markdown: [text](link)
    assert links and all("](http://127.0.0.1:8765/campaign/" in a.data for a in links)
    assert (finished_campaign["ctx"].folder / "calibration.png").is_file()
