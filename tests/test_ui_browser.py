"""The Dagster UI, proven in a real browser (Playwright driving Debian's chromium, `make chromium`).

One demo state is produced per module with the demo's own commands (as tests/test_demo_flow.py runs them:
simulator, `tooling.demo`, publish) against the session's real lakeFS and an MLflow SQLite store; then a real
`dagster-webserver` on a free loopback port serves it. Screenshots go to the test's state folder
(`<pytest tmp>/.../ui_state/screenshots/`, never committed).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tooling.services import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
GROUPS = [f"car_loan_{g}" for g in ("ingestion", "features", "training", "evaluation", "serving", "monitoring")]

pytestmark = [pytest.mark.services, pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(1800)]


def _run(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"$ {' '.join(cmd)} (exit {proc.returncode})\n{proc.stdout[-3000:]}{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def demo_state(tmp_path_factory, lakefs_env):
    """A state folder holding the demo's materializations: one batch scored and monitored, a champion."""
    state = tmp_path_factory.mktemp("ui") / "ui_state"
    home = state / "dagster_home"
    home.mkdir(parents=True)
    shutil.copyfile(ROOT / "platform" / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAKEFS_", "MLFLOW_", "DAGSTER_", "MLP_"))}
    env.update(lakefs_env)
    env.update({"LAKEFS_REPOSITORY": f"ui-{uuid.uuid4().hex[:8]}", "MLP_STATE_DIR": str(state),
                "DAGSTER_HOME": str(home), "NML_DISABLE_USAGE_LOGGING": "1", "DBT_SEND_ANONYMOUS_USAGE_STATS": "False",
                "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DAGSTER_DISABLE_TELEMETRY": "1",
                "PYTHONDONTWRITEBYTECODE": "1"})
    py = sys.executable
    run = [py, "-m", "tooling.env"]
    _run([py, "-m", "tooling.services", "up"], env)
    _run(run + ["mlp", "simulate", "reset"], env)
    _run(run + ["mlp", "simulate", "next", "2"], env)
    _run(run + [py, "-m", "tooling.demo"], env)
    # One iteration of the daemon's freshness evaluation (what `make dev` runs continuously), so the UI has a
    # freshness state to show instead of "Not evaluated".
    _run(run + [py, "-c", FRESHNESS_ONCE], env)
    return {"state": state, "env": env, "lakefs_endpoint": lakefs_env["LAKEFS_ENDPOINT"],
            "repository": env["LAKEFS_REPOSITORY"]}


FRESHNESS_ONCE = """
import dagster as dg
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import WorkspaceFileTarget
from dagster._daemon.freshness import FreshnessDaemon

with dg.DagsterInstance.get() as instance, \\
        WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=["workspace.yaml"])) as ctx:
    list(FreshnessDaemon().run_iteration(ctx))
"""


@pytest.fixture(scope="module")
def webserver(demo_state, request):
    """A real dagster-webserver on a free loopback port over the demo state; stopped after the module."""
    port = free_port()
    env = dict(demo_state["env"])
    log = open(demo_state["state"] / "webserver.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                             "-w", "workspace.yaml"], cwd=ROOT, env={**env, **_mlp_env(demo_state["state"])},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (demo_state["state"] / "webserver.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "dagster-webserver did not answer in 240s"
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the webserver and the code server it started (its own session)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shots = sorted((demo_state["state"] / "screenshots").glob("*.png"))
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\nUI screenshots ({len(shots)}):" + "".join(f"\n  {p}" for p in shots))


def _mlp_env(state: Path) -> dict:
    """The settings `make up` generated (MLFLOW_TRACKING_URI ...), as `python -m tooling.env` loads them."""
    path = state / "mlp.env"
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line) if path.exists() else {}


LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


class Console:
    """Browser console errors and uncaught page errors. Only errors about resources of external hosts (blocked
    here: no internet) are ignored, judged by the URL the error is about, never by its wording."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.ignored: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))

    def _console(self, msg):
        if msg.type != "error":
            return
        url = (msg.location or {}).get("url", "") or ""
        hosts = {urlsplit(u).hostname for u in [url, *re.findall(r"https?://[^\s'\")]+", msg.text)] if u}
        if hosts and not hosts & set(LOOPBACK):
            self.ignored.append(f"{msg.text} ({url})")
            return
        self.errors.append(f"{msg.text} ({url})")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), ("the browser tests need Debian's 'chromium' package: `make chromium` (as root) "
                                     "or `sudo apt-get install chromium`")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, demo_state, request):
    """One page per assertion group; a screenshot of it is saved whatever the outcome."""
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.console = Console(pg)
    shots = demo_state["state"] / "screenshots"
    shots.mkdir(exist_ok=True)
    try:
        yield pg
    finally:
        try:
            pg.screenshot(path=str(shots / f"{request.node.name}.png"), full_page=True)
        finally:
            ctx.close()


def _no_console_errors(pg):
    assert not pg.console.errors, pg.console.errors


def test_the_asset_graph_shows_every_group(page, webserver):
    page.goto(f"{webserver}/asset-groups")
    graph = page.locator("svg foreignObject")
    for group in GROUPS:
        node = graph.locator(f'[data-tooltip="{group}"]')
        node.first.wait_for()
        assert node.first.inner_text().strip() == group
    shown = {el.get_attribute("data-tooltip") for el in graph.locator("[data-tooltip]").all()}
    assert set(GROUPS) <= shown, shown
    from playwright.sync_api import expect

    # the nodes' materialization statuses load (no group left "fetching statuses")
    expect(page.get_by_text("fetching statuses")).to_have_count(0, timeout=60_000)
    _no_console_errors(page)


def test_an_asset_page_links_its_lakefs_commit_and_its_mlflow_run_and_version(page, webserver, demo_state):
    import json

    page.goto(f"{webserver}/assets/car_loan/candidate_model")
    page.get_by_text("mlflow_model_version", exact=True).first.wait_for()
    hrefs = {a.get_attribute("href") for a in page.locator("a[href^='http']").all()}
    commits_prefix = f"{demo_state['lakefs_endpoint'].rstrip('/')}/repositories/{demo_state['repository']}/commits/"
    commits = [h[len(commits_prefix):] for h in hrefs if h.startswith(commits_prefix)]
    assert commits, f"no lakeFS commit link in {sorted(hrefs)}"
    assert any(re.search(r"/#/experiments/\d+/runs/[0-9a-f]{32}$", h) for h in hrefs), sorted(hrefs)
    assert any(h.endswith("/#/models/car_loan-model/versions/1") for h in hrefs), sorted(hrefs)
    # the commit links point at commits that exist in the repository (the link works)
    env = demo_state["env"]
    for commit in commits:
        req = urllib.request.Request(
            f"{demo_state['lakefs_endpoint'].rstrip('/')}/api/v1/repositories/{demo_state['repository']}/commits/{commit}")
        import base64

        token = base64.b64encode(f"{env['LAKEFS_ACCESS_KEY_ID']}:{env['LAKEFS_SECRET_ACCESS_KEY']}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.load(resp)["id"] == commit
    _no_console_errors(page)


def test_evaluation_report_shows_its_metric_table(page, webserver):
    page.goto(f"{webserver}/assets/car_loan/evaluation_report")
    table = page.locator("table").filter(has=page.locator("th", has_text="candidate")).last
    table.wait_for()
    headers = [h.strip() for h in table.locator("th").all_inner_texts()]
    assert headers[:3] == ["metric", "candidate", "champion"], headers
    rows = {r.split("\t")[0].strip(): r for r in table.locator("tbody tr").all_inner_texts()}
    for metric in ("roc_auc", "pr_auc", "log_loss", "brier"):
        assert metric in rows, rows
        assert re.search(r"\b0\.\d{3,}", rows[metric]), rows[metric]
    assert page.get_by_text("promote", exact=True).count() >= 1  # the gate's decision beside it
    _no_console_errors(page)


# Each data set's sensors carry its name (car_loan__...); the publish sensors are the platform's.
SENSORS = [*(f"car_loan__{n}" for n in ("landing_arrivals", "retrain_on_evidence", "rollback_on_regression",
                                        "follow_inputs", "alert_on_run_failure", "alert_on_platform_events")),
           "publish_successful_runs", "keep_failed_run_branches"]


def test_the_sensors_are_listed_and_running(page, webserver):
    from playwright.sync_api import expect

    page.goto(f"{webserver}/automation")
    page.locator("a[href$='/sensors/car_loan__landing_arrivals']").wait_for()
    listed = {a.get_attribute("href").rsplit("/", 1)[-1] for a in page.locator("a[href*='/sensors/']").all()}
    assert set(SENSORS) <= listed, listed
    for name in sorted(listed):
        row = page.locator(f"a[href$='/sensors/{name}']").locator("xpath=..")  # the list item: name and switch
        switch = row.locator("label[class*='formatSwitch'] input[type=checkbox]")
        expect(switch, f"sensor {name} has no on/off switch").to_have_count(1)
        expect(switch, f"sensor {name} is not running").to_be_checked()
    _no_console_errors(page)


def test_the_freshness_state_is_shown(page, webserver):
    page.goto(f"{webserver}/assets/car_loan/features")
    page.get_by_text("Freshness policy", exact=True).first.wait_for()
    page.get_by_text("Passing", exact=True).first.wait_for()
    text = page.inner_text("body")
    assert re.search(r"Freshness policy\s+Passing", text), text[:3000]
    assert "Fails if more than 2 days since last materialization" in text
    assert "Warns if more than 36 hours since last materialization" in text
    _no_console_errors(page)


def test_console_errors_of_the_ui_fail_and_only_blocked_external_ones_are_ignored(page, webserver):
    page.goto(f"{webserver}/server_info")
    page.evaluate("console.error('broken widget')")
    page.evaluate("() => { const s = document.createElement('script'); s.src = '/no-such-bundle.js'; "
                  "document.body.appendChild(s); }")
    page.evaluate("() => { const i = document.createElement('img'); i.src = 'http://fonts.example.invalid/font.woff'; "
                  "document.body.appendChild(i); }")
    page.wait_for_timeout(1500)
    assert any("broken widget" in e for e in page.console.errors), page.console.errors
    assert any("no-such-bundle.js" in e for e in page.console.errors), page.console.errors  # served on loopback
    assert not any("example.invalid" in e for e in page.console.errors), page.console.errors
    assert any("example.invalid" in e for e in page.console.ignored), page.console.ignored
