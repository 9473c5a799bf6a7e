"""The runs as a user sees them: MLflow's UI in headless Chromium, on the store the tiny grid writes.

``mlflow ui`` serves the store; Chromium (the Debian package, which ``.ci/run`` installs) renders the runs
page in the view the framework shares (``cgc_lightning.runs_view``) and the compare page of the grid's
points, and dumps the DOM after the page's scripts ran. The assertions read that DOM: distinct run names,
the method and seed of every run, every task's test metric for every run. Screenshots of both pages go to
``$CGC_TEST_ARTIFACTS/browser`` (default ``test-artifacts/browser``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
TASKS = {"plausible": "accuracy", "qa": "exact_match", "count": "f1"}  # experiments/tiny.yaml
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="no Chromium to drive: `apt-get install chromium` (.ci/run installs it where it can)"
    ),
]


class GridCells(HTMLParser):
    """The cells of an ag-Grid table (MLflow's runs table): ``{row index: {col-id: text}}``.

    A row's pinned and scrolled parts are separate elements with the same ``row-index``; they join here."""

    def __init__(self):
        super().__init__()
        self.rows: dict[int, dict[str, str]] = {}
        self._row: int | None = None
        self._cell: tuple[int, str] | None = None
        self._depth = 0
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in PlacedCells.VOID:
            return
        a = dict(attrs)
        if a.get("role") == "row" and a.get("row-index", "").lstrip("-").isdigit():
            self._row = int(a["row-index"])
        if self._cell is not None:
            self._depth += 1
        elif a.get("role") == "gridcell" and self._row is not None and a.get("col-id"):
            self._cell, self._depth, self._text = (self._row, a["col-id"]), 1, []

    def handle_endtag(self, tag):
        if self._cell is None or tag in PlacedCells.VOID:
            return
        self._depth -= 1
        if self._depth == 0:
            row, col = self._cell
            self.rows.setdefault(row, {})[col] = " ".join("".join(self._text).split())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._text.append(data)


class PlacedCells(HTMLParser):
    """Text of every absolutely placed cell (the compare page's virtualised lists): ``[(top, text)]``."""

    VOID = {"br", "img", "input", "hr", "meta", "link", "path", "col", "source"}

    def __init__(self):
        super().__init__()
        self.cells: list[tuple[float, str]] = []
        self._depth = 0
        self._open: list | None = None

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        self._depth += 1
        style = dict(attrs).get("style") or ""
        top = re.search(r"top: ([\d.]+)px", style)
        if self._open is None and "position: absolute" in style and top:
            self._open = [self._depth, float(top[1]), []]

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if self._open is not None and self._depth == self._open[0]:
            self.cells.append((self._open[1], " ".join("".join(self._open[2]).split())))
            self._open = None
        self._depth -= 1

    def handle_data(self, data):
        if self._open is not None:
            self._open[2].append(data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium(url: str, *, dom: bool, shot: Path | None = None, size: str = "2400,1200") -> str:
    """The DOM of ``url`` once its scripts settled (``--dump-dom``), or a screenshot into ``shot``."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size}"]
    args += ["--virtual-time-budget=30000", "--dump-dom" if dom else f"--screenshot={shot}", url]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def served_grid(tmp_path_factory):
    """The tiny grid run into a fresh store, that store served by ``mlflow ui``: (base URL, client, experiment id)."""
    from mlflow import MlflowClient

    work = tmp_path_factory.mktemp("browser")
    for name in ("tests", "experiments"):
        (work / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "cgc_lightning", "grid", "--config", "experiments/grids/tiny.yaml", "--jobs", "2"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    uri = f"sqlite:///{work}/mlruns/mlflow.db"
    port = _free_port()
    ui = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    log = open(work / "mlflow-ui.log", "w")  # noqa: SIM115
    server = subprocess.Popen(ui, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(base, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow ui did not come up: {(work / 'mlflow-ui.log').read_text()[-2000:]}")
            time.sleep(1)
        client = MlflowClient(uri)
        yield base, client, client.get_experiment_by_name("tiny-grid").experiment_id
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def shots() -> Path:
    out = Path(os.environ.get("CGC_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_runs_page_names_every_run_with_its_method_seed_and_task_scores(served_grid, shots):
    from cgc_lightning.runs_view import runs_url

    base, client, exp = served_grid
    url = runs_url(exp, base)
    parser = GridCells()
    parser.feed(_chromium(url, dom=True))
    _chromium(url, dom=False, shot=shots / "runs_page.png", size="2400,900")
    points = client.search_runs([exp], "tags.`grid.role` = 'point'")
    assert len(points) == 4
    shown = [r for r in parser.rows.values() if r.get("attributes.`Run Name`", "").startswith(("cgc_lora", "indep"))]
    names = [r["attributes.`Run Name`"] for r in shown]
    assert sorted(names) == sorted(p.info.run_name for p in points), f"the page shows {names}"
    assert len(set(names)) == 4, f"run names repeat: {names}"
    for row in shown:
        method, seed = row["params.`method`"], row["params.`seed`"]
        assert (method, seed) in {
            ("cgc_lora", "1"),
            ("cgc_lora", "2"),
            ("independent_lora", "1"),
            ("independent_lora", "2"),
        }
        assert row["attributes.`Run Name`"].startswith(f"{method} seed={seed} "), row
        for task, metric in TASKS.items():
            value = row.get(f"metrics.`test/{task}/{metric}`")
            assert value is not None and re.fullmatch(r"[0-9.e-]+", value), f"test/{task}/{metric} of {row}"
        assert re.fullmatch(r"[0-9.e-]+", row["metrics.`test/avg/score`"])
    # the runs are grouped by method; each group's row is the mean over its seeds
    groups = [r for r in parser.rows.values() if r.get("params.`seed`") == "1.5"]
    assert len(groups) == 2 and all(g["metrics.`test/avg/score`"].endswith("(average)") for g in groups)


def test_compare_page_lists_every_tasks_test_metric_for_every_run(served_grid, shots):
    base, client, exp = served_grid
    ids = [r.info.run_id for r in client.search_runs([exp], "tags.`grid.role` = 'point'")]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp])})
    url = f"{base}/#/compare-runs?{query}"
    html = _chromium(url, dom=True, size="2000,2400")
    _chromium(url, dom=False, shot=shots / "compare_page.png", size="1800,2400")
    for run_id in ids:
        assert run_id in html
    names = [client.get_run(i).info.run_name for i in ids]
    assert all(n in html for n in names), "every run's name is in the run details"
    metrics = html[html.find(">Metrics<") : html.find(">Artifacts<")]
    parser = PlacedCells()
    parser.feed(metrics)
    rows: dict[float, list[str]] = {}
    for top, text in parser.cells:
        rows.setdefault(top, []).append(text)
    table = {}
    for texts in rows.values():
        keys = [t for t in texts if "/" in t or t == "epoch"]
        if len(keys) == 1:
            table[keys[0]] = [t for t in texts if t != keys[0]]
    for task, metric in TASKS.items():
        values = table.get(f"test/{task}/{metric}")
        assert values is not None and len(values) == 4, f"test/{task}/{metric}: {values} (rows: {sorted(table)})"
        assert all(re.fullmatch(r"[0-9.e-]+", v) for v in values), values
    # the per-task diagnostics are tables, not metrics: the metric list is short, the test metrics within reach
    assert len(table) < 30, sorted(table)
