"""`tunelab label` in a real headless browser (Debian's chromium driven by Playwright): guidelines, labels by
keyboard, undo, the file they leave, model text that holds HTML shown as text, and rm trained on those labels.

Skipped, with the reason printed as a warning, where playwright or chromium is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings

import pytest

from tests.helpers import make_tiny_model_dir
from tests.labeling import ThreadServer, candidate_session, read_labels, review_candidates, write_candidates
from tunelab.cli import main

pytest.importorskip("starlette", reason="the label extra is not installed: pip install \"tunelab[label]\"")

GUIDELINES = "# House rules\n\nPrefer the review that **names the film** and sounds like a person.\n"


def chromium_path() -> str | None:
    for name in (os.environ.get("TUNELAB_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _skip(reason: str):
    warnings.warn(f"browser tests skipped: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("playwright is not installed (pip install playwright; the test extra has it)")
    path = chromium_path()
    if path is None:
        _skip("no chromium found (apt-get install chromium, or set TUNELAB_CHROMIUM to a Chromium executable)")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        except Exception as exc:  # a browser that cannot start here
            _skip(f"chromium at {path} does not start: {str(exc).splitlines()[0]}")
        yield launched
        launched.close()


def shown(page) -> dict:
    return {"prompt": page.text_content("#prompt"), "a": page.text_content("#text-a"),
            "b": page.text_content("#text-b")}


def press_and_wait(page, keys: list[str], before: str) -> None:
    """Press the keys, then wait until the page shows another prompt (or none)."""
    for key in keys:
        page.keyboard.press(key)
    page.wait_for_function("(before) => document.getElementById('prompt').textContent !== before || "
                           "document.getElementById('pair').hidden", arg=before)


@pytest.fixture(scope="module")
def labeled(browser, tmp_path_factory):
    """A labeling session by keyboard: A, a tie with a comment, B, undo (B goes), skip, A."""
    folder = tmp_path_factory.mktemp("label-browser")
    candidates = write_candidates(folder / "candidates.jsonl", n=5)
    output = folder / "prefs.jsonl"
    seen, files = [], {}
    with ThreadServer(candidate_session(candidates, output, labeler="browser-labeler"), GUIDELINES) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url)
        page.wait_for_selector("#guidelines h1")
        guidelines = page.text_content("#guidelines")
        page.screenshot(path=str(folder / "guidelines.png"), full_page=True)
        page.keyboard.press("Enter")  # the start button has the focus
        page.wait_for_selector("#pair", state="visible")

        seen.append(shown(page))
        page.keyboard.press("1")
        page.screenshot(path=str(folder / "labeling.png"), full_page=True)
        press_and_wait(page, ["Enter"], seen[-1]["prompt"])

        seen.append(shown(page))
        page.keyboard.press("3")
        page.focus("#comment")
        page.keyboard.type("both name the film")
        press_and_wait(page, ["Enter"], seen[-1]["prompt"])  # Enter in the comment box submits

        seen.append(shown(page))
        press_and_wait(page, ["2", "Enter"], seen[-1]["prompt"])
        rows_before_undo = len(read_labels(output))
        fourth = shown(page)
        press_and_wait(page, ["u"], fourth["prompt"])
        after_undo = shown(page)
        rows_after_undo = [r["prompt"] for r in read_labels(output)]
        notice = page.text_content("#notice")
        press_and_wait(page, ["s", "Enter"], after_undo["prompt"])

        seen.append(shown(page))
        press_and_wait(page, ["1", "Enter"], seen[-1]["prompt"])
        page.wait_for_function("() => document.getElementById('progress').textContent.startsWith('4 / 5')")
        progress = page.text_content("#progress")
        page.close()
    return {"output": output, "seen": seen, "guidelines": guidelines, "rows_before_undo": rows_before_undo,
            "after_undo": after_undo, "rows_after_undo": rows_after_undo, "notice": notice, "progress": progress,
            "folder": folder, "errors": errors}


def test_guidelines_then_labels_by_keyboard_with_undo(labeled):
    assert "House rules" in labeled["guidelines"] and "names the film" in labeled["guidelines"]
    seen = labeled["seen"]
    assert len({s["prompt"] for s in seen}) == 4 and all(s["a"] and s["b"] for s in seen)
    assert labeled["rows_before_undo"] == 3
    assert labeled["after_undo"] == seen[2]  # the undone item, its sides as before
    assert labeled["rows_after_undo"] == [seen[0]["prompt"], seen[1]["prompt"]]
    assert "undone" in labeled["notice"]
    assert labeled["progress"].startswith("4 / 5 labeled") and "4 by you" in labeled["progress"]
    labels = read_labels(labeled["output"])
    assert [r["choice"] for r in labels] == ["A", "tie", "skip", "A"]
    assert [r["prompt"] for r in labels] == [s["prompt"] for s in seen]
    for row, pair in zip(labels, seen):
        assert (row["chosen"], row["rejected"]) == (pair["a"], pair["b"])  # A, tie, skip: chosen is the left one
        assert row["labeler"] == "browser-labeler"
        assert {row["chosen_source"], row["rejected_source"]} == {"warm", "cold"}
    assert labels[1]["comment"] == "both name the film"
    assert not labeled["errors"]
    for name in ("guidelines.png", "labeling.png"):
        assert (labeled["folder"] / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rm_trains_on_the_labels_the_browser_wrote(labeled, tmp_path, capsys):
    model = make_tiny_model_dir(tmp_path / "model")
    code = main(["rm", "--model", str(model), "--data", str(labeled["output"]), "--output", str(tmp_path / "rm"),
                 "--max-steps", "2", "--batch-size", "2", "--peft", "none", "--quiet", "train.report=false"])
    assert code == 0
    err = capsys.readouterr().err
    assert "4 rows, 2 kept" in err and "1 ties and 1 skips dropped" in err
    assert (tmp_path / "rm" / "final" / "config.json").is_file()


def test_model_text_with_html_is_shown_as_text_and_never_runs(browser, tmp_path):
    payload_a = '<script>window.__xss = "a"</script>Plain answer'
    payload_b = '<img src=x onerror="window.__xss = \'b\'"> Image answer'
    rows = [{"prompt": 'Review <b>this</b> <script>window.__xss = "prompt"</script>',
             "responses": [payload_a, payload_b], "sources": ["x", "y"]}] + review_candidates(1)
    candidates = write_candidates(tmp_path / "candidates.jsonl", rows=rows)
    guidelines = "# Rules\n\n<script>window.__xss = 'guidelines'</script>\n\n<img src=x onerror=\"window.__xss = 'g'\">"
    output = tmp_path / "prefs.jsonl"
    with ThreadServer(candidate_session(candidates, output), guidelines) as server:
        page = browser.new_page()
        dialogs = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(server.url)
        page.wait_for_selector("#guidelines h1")
        page.keyboard.press("Enter")
        page.wait_for_selector("#pair", state="visible")
        texts = {page.text_content("#text-a"), page.text_content("#text-b")}
        assert texts == {payload_a, payload_b}
        assert page.text_content("#prompt") == rows[0]["prompt"]
        assert "<script>window.__xss = 'guidelines'</script>" in page.text_content("#guidelines")
        assert page.evaluate("window.__xss") is None
        assert page.locator("img").count() == 0 and page.locator("#prompt b").count() == 0
        page.keyboard.press("1")
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.getElementById('progress').textContent.startsWith('1 / 2')")
        assert page.evaluate("window.__xss") is None and not dialogs
        page.close()
    row = read_labels(output)[0]
    assert row["chosen"] in (payload_a, payload_b) and json.dumps(row)


def test_two_tabs_get_different_items_and_a_closed_tab_gives_its_item_back(browser, tmp_path):
    candidates = write_candidates(tmp_path / "candidates.jsonl", n=3)
    with ThreadServer(candidate_session(candidates, tmp_path / "prefs.jsonl")) as server:
        context = browser.new_context()  # one browser profile: the tabs share storage, as real tabs do

        def open_tab():
            tab = context.new_page()
            tab.goto(server.url)
            tab.wait_for_selector("#guidelines h1")
            tab.keyboard.press("Enter")
            tab.wait_for_selector("#pair", state="visible")
            return tab, tab.text_content("#prompt")

        first, first_prompt = open_tab()
        second, second_prompt = open_tab()
        assert first_prompt != second_prompt
        first.close(run_before_unload=True)
        deadline = time.monotonic() + 10
        while server.session.leases and len(server.session.leases) > 1:  # the closing tab said so
            assert time.monotonic() < deadline
            time.sleep(0.05)
        third, third_prompt = open_tab()
        assert third_prompt == first_prompt
        context.close()
