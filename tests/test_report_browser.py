"""The report and the chart HTML in a real headless browser (Debian's chromium), driven over the
DevTools protocol on a pipe: every chart draws, nothing is fetched, the console stays clean,
no dialog opens, and hostile tensor names show literally.

Needs ``chromium`` (``apt-get install -y chromium``); skipped when it is not installed.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import weightatlas as wa
import weightatlas.viz as viz
from tests.test_viz_helpers import HOSTILE
from weightatlas.storage import RecordsSource, Snapshot, Store, TensorRecord

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             "/usr/lib/chromium/chromium") if p and os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                "(apt-get install -y chromium)")


class Browser:
    """Headless chromium spoken to over ``--remote-debugging-pipe`` (fds 3 and 4, NUL-framed
    JSON): no port, no websocket library, no browser download."""

    def __init__(self, profile: Path) -> None:
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def wire() -> None:  # in the child: the pipe ends become fds 3 and 4, inheritable
            r, w = os.dup(to_r), os.dup(from_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        assert CHROMIUM is not None
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-extensions", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=wire, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 60) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._recv(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _recv(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._from_r], [], [], max(0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._from_r, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def open(self, url: str) -> str:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"]
        for domain in ("Runtime.enable", "Page.enable", "Log.enable", "Network.enable"):
            self.send(domain, session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        return session

    def evaluate(self, session: str, expression: str, timeout: float = 60) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session, timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, session: str, expression: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(session, expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(expression)

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, dialogs and network requests."""
        found = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning",
                                                                             "assert"):
                found.append(f"console.{params['type']}: {params['args']}")
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                found.append(f"log: {params['entry'].get('text')}")
            elif method == "Page.javascriptDialogOpening":
                found.append(f"dialog: {params.get('message')}")
            elif method == "Network.requestWillBeSent" and \
                    not params["request"]["url"].startswith(("file:", "data:", "blob:", "about:")):
                found.append(f"request: {params['request']['url']}")
        return found

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_w)
        os.close(self._from_r)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


STATE = ("JSON.stringify({ok: window.weightatlas.ok, error: window.weightatlas.error, "
         "total: window.weightatlas.total, errors: window.weightatlas.errors})")
DRAWN = ("Array.from(document.querySelectorAll('.wa-chart')).filter(el => el.dataset.state === "
         "'ok' && Array.from(el.querySelectorAll('canvas, svg.marks')).some(c => "
         "c.getBoundingClientRect().width > 50 && c.getBoundingClientRect().height > 20)).length")


@pytest.fixture(scope="module")
def resnet_with_hostile_names(tmp_path_factory) -> Snapshot:
    """ResNet-18's state dict plus tensors with hostile names, saved by the reference
    safetensors library and ingested."""
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    from tests.models import resnet18

    state = {k: v.contiguous() for k, v in resnet18(num_classes=100).state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    for i, name in enumerate(HOSTILE):
        state[name] = torch.randn((8, 4, 3, 3) if i % 2 else (16, 12), generator=gen)
    state[HOSTILE[1]][0, 0, 0, 0] = float("nan")
    folder = tmp_path_factory.mktemp("resnet-hostile")
    st_torch.save_file(state, str(folder / "resnet18.safetensors"))
    return wa.ingest(folder / "resnet18.safetensors", store=folder / "store")


@pytest.mark.slow
def test_report_of_a_real_model_draws_every_chart_in_a_browser(browser, resnet_with_hostile_names,
                                                               tmp_path):
    snap = resnet_with_hostile_names
    path = viz.save_report(snap, tmp_path / "report.html")
    session = browser.open(path.as_uri())
    browser.wait_for(session, "window.weightatlas && window.weightatlas.ok >= 1")
    first = json.loads(browser.evaluate(session, STATE))
    assert 0 < first["ok"] < first["total"]  # drawn lazily: the overview first, not all
    browser.evaluate(session, "window.weightatlas.renderAll().then(() => true)", timeout=120)
    state = json.loads(browser.evaluate(session, STATE))
    assert state["error"] == 0, state["errors"]
    assert state["ok"] == state["total"] > 150
    assert browser.evaluate(session, DRAWN) == state["total"]
    titles = browser.evaluate(session, "Array.from(document.querySelectorAll('section.tensor "
                                       "h3')).map(h => h.textContent)")
    assert titles == snap.names  # every name literally, hostile ones included
    assert browser.evaluate(session, "document.querySelectorAll('script').length") == \
        2 + state["total"]  # the bundle, the page's script, one JSON block per chart
    assert browser.problems() == []


def test_chart_html_draws_with_svg_and_shows_hostile_names_as_text(browser, tmp_path):
    rng = np.random.default_rng(2)
    store = Store(tmp_path / "store", create=True)
    snap = store.write(RecordsSource([TensorRecord(n, rng.standard_normal((5, 7)))
                                      for n in HOSTILE]), "evil", step=0)
    for i, name in enumerate(HOSTILE):
        out = viz.save(viz.heatmap(snap, name), tmp_path / f"chart{i}.html")
        session = browser.open(out.as_uri())
        browser.wait_for(session, "window.weightatlas && window.weightatlas.ok === 1")
        texts = browser.evaluate(session, "Array.from(document.querySelectorAll('.wa-chart svg "
                                          "text')).map(t => t.textContent)")
        assert name in texts
        assert browser.evaluate(session, "document.querySelectorAll('.wa-chart svg path"
                                         "[aria-roledescription=\"rect mark\"]').length") == 35
    assert browser.problems() == []


# Page coordinates of the overview's bar for tensor 12 (first panel), from Vega's scenegraph.
BAR_12 = """(() => {
  const el = document.querySelector('[data-spec="s-overview"]');
  const view = el._view, box = el.querySelector('canvas').getBoundingClientRect();
  let found = null;
  (function walk(mark, ox, oy) {
    for (const it of mark.items || []) {
      if (mark.marktype === 'rect' && it.datum && it.datum.i === 12 && !found) {
        found = [ox + it.x + it.width / 2, oy + it.y + it.height / 2];
      }
      for (const child of it.items || []) { walk(child, ox + (it.x || 0), oy + (it.y || 0)); }
    }
  })(view.scenegraph().root, 0, 0);
  const [dx, dy] = view.origin();
  return JSON.stringify([box.left + dx + found[0], box.top + dy + found[1]]);
})()"""


def test_overview_bars_link_to_their_sections(browser, tmp_path):
    rng = np.random.default_rng(9)
    store = Store(tmp_path / "store", create=True)
    snap = store.write(RecordsSource([TensorRecord(f"layer{i}.weight",
                                                   rng.standard_normal((12, 12)))
                                      for i in range(20)]), "m", step=0)
    session = browser.open(viz.save_report(snap, tmp_path / "r.html").as_uri())
    browser.wait_for(session, "window.weightatlas && window.weightatlas.ok >= 1")
    x, y = json.loads(browser.evaluate(session, BAR_12))
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        browser.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y,
                                                  "button": "left", "clickCount": 1}, session)
    assert browser.wait_for(session, "location.hash") == "#t-12"
    assert browser.evaluate(session, "window.scrollY > 0")
    assert browser.problems() == []


def test_the_harness_sees_a_chart_that_fails(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(viz.to_html({"mark": "no-such-mark", "data": {"values": [{}]}}))
    own = Browser(tmp_path / "profile")
    try:
        session = own.open(page.as_uri())
        own.wait_for(session, "window.weightatlas && window.weightatlas.error === 1")
        state = json.loads(own.evaluate(session, STATE))
        assert state["ok"] == 0 and len(state["errors"]) == 1
        assert any(p.startswith("console.error") for p in own.problems())
    finally:
        own.close()


def test_tooltips_show_hostile_names_as_text(browser, tmp_path):
    rng = np.random.default_rng(3)
    store = Store(tmp_path / "store", create=True)
    snap = store.write(RecordsSource([TensorRecord(n, rng.standard_normal((4, 4)))
                                      for n in HOSTILE]), "evil", step=0)
    page = viz.save(viz.overview(snap), tmp_path / "overview.html")
    session = browser.open(page.as_uri())
    browser.wait_for(session, "window.weightatlas && window.weightatlas.ok === 1")
    bars = json.loads(browser.evaluate(session, """JSON.stringify(Array.from(
        document.querySelectorAll('.wa-chart svg path[aria-roledescription="bar"]'))
        .slice(0, 6).map(p => { const r = p.getBoundingClientRect();
                                return [r.left + r.width / 2, r.top + r.height / 2]; }))"""))
    assert len(bars) == len(HOSTILE)
    for (x, y), name in zip(sorted(bars, key=lambda b: b[1]), HOSTILE, strict=True):
        browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y}, session)
        shown = ("((document.querySelector('#vg-tooltip-element.visible') || {}).textContent"
                 f" || '').includes({json.dumps(name)})")
        assert browser.wait_for(session, shown) is True
        assert browser.evaluate(session, "document.querySelectorAll('#vg-tooltip-element img, "
                                         "#vg-tooltip-element script').length") == 0
    assert browser.problems() == []


def test_overview_filters_by_kind(browser, tmp_path):
    rng = np.random.default_rng(4)
    recs = [TensorRecord(f"block{i}.{part}", rng.standard_normal(shape) + 1,
                         kind="norm" if part == "norm" else "linear")
            for i in range(3) for part, shape in (("weight", (6, 6)), ("norm", (6,)))]
    snap = Store(tmp_path / "store", create=True).write(RecordsSource(recs), "m", step=0)
    session = browser.open(viz.save(viz.overview(snap), tmp_path / "o.html").as_uri())
    browser.wait_for(session, "window.weightatlas && window.weightatlas.ok === 1")
    bars = ("document.querySelectorAll('.wa-chart svg path[aria-roledescription=\"bar\"]')"
            ".length")
    assert browser.evaluate(session, bars) == 6 * 6  # 6 tensors in 6 panels
    options = browser.evaluate(session, "Array.from(document.querySelectorAll('.wa-chart "
                                        "select option')).map(o => o.value)")
    assert options == ["all", "linear", "norm"]
    browser.evaluate(session, "(() => { const s = document.querySelector('.wa-chart select'); "
                              "s.value = 'norm'; s.dispatchEvent(new Event('change')); "
                              "return 1; })()")
    assert browser.wait_for(session, f"{bars} === 3 * 6") is True
    assert browser.problems() == []
