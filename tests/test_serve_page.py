"""The page at `GET /` in a real headless Chromium (Debian's `chromium`), driven through the
DevTools protocol over a pipe: it loads the model's card, takes a real image from the file
picker, and shows the export's own top-1 label and the Grad-CAM overlay. The screenshot is
kept in the test's tmp folder. Without Chromium the test fails: `.ci/run` installs it."""

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
import urllib.request

import pytest

import tlkit
from conftest import DIGITS
from tlkit.serve import ModelServer

IMAGE = DIGITS / "7" / "7_0061.png"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900", "--remote-debugging-pipe"]
LIMIT = 60  # seconds for any one wait on the browser


class Browser:
    """Chromium with the DevTools protocol on fds 3 (commands in) and 4 (answers out)."""

    def __init__(self, profile):
        executable = shutil.which("chromium") or shutil.which("chromium-browser")
        if executable is None:
            pytest.fail("Chromium is needed: apt-get install -y chromium (.ci/run does)")
        commands_read, self._commands = os.pipe()
        self._answers, answers_write = os.pipe()
        # above fd 4, so that placing them on 3 and 4 in the child cannot clobber one another
        commands_read, answers_write = (_above_4(commands_read), _above_4(answers_write))

        def wire():  # in the child: dup2 leaves 3 and 4 inheritable, the rest stay CLOEXEC
            os.dup2(commands_read, 3)
            os.dup2(answers_write, 4)

        self.process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            close_fds=False, preexec_fn=wire, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(answers_write)
        self._buffer, self._id, self.session = b"", 0, None

    def send(self, method, **params):
        """Sends one command and returns its result (events in between are dropped)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + LIMIT
        while True:
            answer = self._next(deadline)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise AssertionError(f"{method}: {answer['error']}")
                return answer["result"]

    def _next(self, deadline):
        while b"\0" not in self._buffer:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([self._answers], [], [], wait)[0]:
                raise AssertionError("Chromium did not answer in time")
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise AssertionError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url):
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]

    def evaluate(self, expression):
        return self.send("Runtime.evaluate", expression=expression,
                         returnByValue=True)["result"].get("value")

    def wait_for(self, expression):
        """Polls a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + LIMIT
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self):
        try:
            self.send("Browser.close")
            self.process.wait(10)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._answers)


def _above_4(fd):
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


def test_the_page_classifies_a_real_image_in_headless_chromium(digits_export, tmp_path):
    expected = tlkit.load(digits_export).predict([IMAGE])[0]
    with ModelServer(digits_export, port=0, grpc_port=None) as server:
        root = f"http://127.0.0.1:{server.rest_port}/"
        with urllib.request.urlopen(root, timeout=10) as response:
            page = response.read().decode()
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert '<meta name="tlkit-model" content="digits">' in page
        assert "http://" not in page.replace(root, "") and "https://" not in page  # no CDN

        browser = Browser(tmp_path / "profile")
        try:
            browser.open(root)
            browser.wait_for("document.querySelector('#meta dl.facts') !== null")
            facts = browser.evaluate("document.querySelector('#meta').innerText")
            assert "16 x 16 (squash)" in facts and "10: 0, 1, 2, 3" in facts
            assert "accuracy" in facts and "Model card" in facts
            document = browser.send("DOM.getDocument")["root"]["nodeId"]
            picker = browser.send("DOM.querySelector", nodeId=document,
                                  selector="#files")["nodeId"]
            browser.send("DOM.setFileInputFiles", nodeId=picker, files=[str(IMAGE)])
            browser.wait_for("document.querySelector('.result[data-done]') !== null")
            shown = browser.evaluate("""(() => {
                const result = document.querySelector('.result');
                return {top1: result.querySelector('.top1') && result.querySelector('.top1')
                        .textContent, scores: [...result.querySelectorAll('.score')]
                        .map(s => s.textContent), explained: result.dataset.explained || '',
                        status: result.querySelector('.status').textContent};
            })()""")
            shot = browser.send("Page.captureScreenshot", format="png")["data"]
        finally:
            browser.close()
    screenshot = tmp_path / "page.png"
    screenshot.write_bytes(base64.b64decode(shot))
    assert shown["top1"] == expected.label, shown
    assert shown["scores"][0] == f"{100 * expected.probabilities[0]:.1f}%"
    assert len(shown["scores"]) == 5
    assert shown["explained"] == "true", shown
    assert shown["status"] == f"Grad-CAM for {expected.label}"
    assert screenshot.stat().st_size > 10_000
