"""A participant completes a study in real headless Chromium (Debian's ``chromium``, driven by
Playwright), clicking through the served pages; the admin export then holds exactly their answers.

Skipped where Chromium or Playwright is missing, except under CI (``CI=true``), which installs both.
"""

import httpx
import pytest

from conftest import XSS_CLASS, LiveStudyServer, chromium_playwright, make_study


def _answer(page, two_stage, start=0, limit=100):
    """Click through up to ``limit`` answers; returns what was clicked, in order, as
    (stage, decision or label, confidence)."""
    clicked = []
    for n in range(start, start + limit):
        page.wait_for_selector("#trial:not([hidden]), #done:not([hidden])")
        if page.locator("#done").is_visible():
            return clicked
        progress = page.locator("#progress").text_content()
        stage_initial = page.locator("#own").is_visible()
        confidence = 1 + n % 4
        if stage_initial:
            # no class is chosen for the participant: with a confidence alone, Next stays disabled (it took class 0)
            page.check(f"input[name=confidence][value='{confidence}']")
            assert page.locator("#label").input_value() == "" and page.locator("#submit").is_disabled()
            label = n % 3
            page.select_option("#label", str(label))
            clicked.append(("initial", label, confidence))
        else:
            if two_stage:  # the second stage shows the participant's own first answer, which Reject keeps
                assert page.locator("#own-answer").text_content().startswith("Your answer: ")
            decision = "accept" if n % 3 else "reject"
            page.check(f"#choice-{decision}")
            clicked.append(("final" if two_stage else "decision", decision, confidence))
        page.check(f"input[name=confidence][value='{confidence}']")
        page.click("#submit")
        page.wait_for_function("p => document.querySelector('#progress').textContent !== p", arg=progress)
    return clicked


@pytest.mark.slow
@pytest.mark.parametrize("two_stage", [False, True])
def test_participant_completes_study(tmp_path, study_source, two_stage):
    chromium, sync_playwright = chromium_playwright()
    folder = make_study(tmp_path / "s", study_source, items=4, conditions=["full"], two_stage=two_stage)
    with LiveStudyServer(folder) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors, dialogs, remote = [], [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("request", lambda r: remote.append(r.url) if not r.url.startswith((server.url, "data:")) else None)
            page.goto(server.url + "/")
            page.click("#consent")
            page.wait_for_selector("#trial:not([hidden])")
            # the explanation of 'full' is shown, the class named like a script is shown as text
            assert page.locator("#explanation .view").count() >= (0 if two_stage else 3)
            if two_stage:
                assert page.locator("#label option").nth(1).text_content() == XSS_CLASS
            clicked = _answer(page, two_stage, limit=3)
            page.reload()  # resumes at the answer due, without a new session
            clicked += _answer(page, two_stage, start=3)
            assert page.locator("#done").is_visible()
            code = page.locator("#code").text_content()
            page.reload()  # after the end, a reload shows the completion code again
            page.wait_for_selector("#done:not([hidden])")
            assert page.locator("#code").text_content() == code
            page.goto(server.url + "/")  # the consent page says the study is finished, not "Continue the study"
            page.wait_for_selector("#finished:not([hidden])")
            assert page.locator("#finished-code").text_content() == code and not page.locator("#consent").is_visible()
        finally:
            browser.close()
        export = httpx.get(server.url + "/admin/export.json",
                           headers={"Authorization": f"Bearer {server.admin_token}"}).json()["responses"]
    assert errors == [] and dialogs == [] and remote == []
    assert len(code) == 8
    got = [(r["stage"], r["label"] if r["stage"] == "initial" else r["decision"], r["confidence"]) for r in export]
    assert len(got) == 4 * (2 if two_stage else 1) and len({r["session_id"] for r in export}) == 1
    assert got == clicked


# one participant in two tabs: an answer given in one is kept when the other, still on that question, answers it
# differently; the other tab says so in words and moves on (it showed "Trial 8 (decision) was already answered
# differently", kept the question, and never hid the message again). A session the study no longer knows says to
# start again, with a link, not "start one with POST /api/sessions"
@pytest.mark.slow
def test_two_tabs_and_stale_session(tmp_path, study_source):
    chromium, sync_playwright = chromium_playwright()
    folder = make_study(tmp_path / "s", study_source, items=4, conditions=["none"])
    with LiveStudyServer(folder) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context()
            a, b = context.new_page(), context.new_page()
            a.goto(server.url + "/")
            a.click("#consent")
            a.wait_for_selector("#trial:not([hidden])")
            b.goto(server.url + "/study")
            b.wait_for_selector("#trial:not([hidden])")
            assert a.locator("#progress").text_content() == b.locator("#progress").text_content() == "Question 1 of 4"
            _answer(a, False, limit=1)
            b.check("#choice-reject")
            b.check("input[name=confidence][value='2']")
            b.click("#submit")
            b.wait_for_function("() => document.querySelector('#progress').textContent === 'Question 2 of 4'")
            note = b.locator("#error").text_content()
            assert "had already been answered" in note and "Trial" not in note
            _answer(b, False, start=1, limit=1)
            assert b.locator("#progress").text_content() == "Question 3 of 4" and not b.locator("#error").is_visible()
            b.evaluate("localStorage.setItem('actclust-study-session', JSON.stringify({session_id: 'gone', token: 'x'}))")
            b.goto(server.url + "/study")
            b.wait_for_selector("#error:not([hidden])")
            said = b.locator("#error").text_content()
            assert "no longer known" in said and "POST" not in said
            assert b.locator("#error a").get_attribute("href") == "/"
        finally:
            browser.close()
        export = httpx.get(server.url + "/admin/export.json",
                           headers={"Authorization": f"Bearer {server.admin_token}"}).json()["responses"]
    assert [r["decision"] for r in export][:1] == ["accept" if 0 % 3 else "reject"] and len(export) == 2


# a tabular study: feature and class names that look like markup are shown as text, and run nothing; every table of
# a trial lists the features in the item's order (an outside check found file order), the first twelve shown and the
# others a click away (they could not be opened)
@pytest.mark.slow
def test_feature_tables(tmp_path):
    import json

    import numpy as np
    import torch
    from torch import nn

    from actclust import ActivationClustering
    from actclust.study import create_study

    chromium, sync_playwright = chromium_playwright()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 20)).astype(np.float32)
    y = rng.integers(0, 2, 90)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    ac = ActivationClustering(mlp, ["0", "2"], n_clusters=3, progress=False).fit(x, y)
    evil = '<img src=x onerror="alert(2)">'
    names = [evil] + [f"f{i}" for i in range(1, 19)] + ["a_feature_name_without_a_break_" * 5]
    folder = create_study(ac, x, y, tmp_path / "s", train=x, items=4, conditions=["similar"], k=2,
                          class_names=[XSS_CLASS, "b"], feature_names=names)
    items = {it["id"]: it for it in json.loads((folder / "study.json").read_text())["items"]}
    with LiveStudyServer(folder) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 375, "height": 800})
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(server.url + "/")
            page.click("#consent")
            page.wait_for_selector("#trial:not([hidden])")
            first = page.locator("#item .feature-table > table.features td").all_text_contents()
            folded_before = page.locator("#item details.more-features").get_attribute("open")
            summary = page.locator("#item details.more-features summary").text_content()
            page.click("#item details.more-features summary")
            folded = page.locator("#item details.more-features td").all_text_contents()
            page.evaluate("() => document.querySelectorAll('details').forEach(d => { d.open = true; })")
            # a long, unbroken name is cut short: the values stay on a phone's screen (it scrolled 1,620 px wide)
            wide = page.evaluate("() => document.documentElement.scrollWidth")
            injected = page.locator("#trial img[src='x']").count()
            prediction = page.locator("#advice strong").text_content()
            # the same trial's samples (condition "similar", one stage: shown with the item)
            sample = page.locator("#explanation .sample .feature-table > table.features").first
            sample_names = sample.locator("td").all_text_contents()[0::2]
        finally:
            browser.close()
    shown, rest = first[0::2], folded[0::2]
    assert len(shown) == 12 and folded_before is None and summary == "8 more features" and len(rest) == 8
    # each trial in its item's order, as create_study computed it from the training inputs (not file order)
    orders = [[names[j] for j in it["feature_order"]] for it in items.values()]
    assert shown + rest in orders and shown != names[:12]
    assert sample_names == shown  # the samples' tables in the item's order too
    assert evil in shown + rest and injected == 0 and dialogs == [] and wide <= 375
    assert prediction.strip("\u2068\u2069") in (XSS_CLASS, "b")  # as text (between invisible bidi isolates)


_NUMBERS_AFTER_NAMES_JS = """() => {
  // each "(" after a class name (the AI's confidence, a class's probability) is drawn right of the name
  const out = [];
  const strong = document.querySelector('#advice strong'), paren = strong && strong.nextSibling;
  if (paren) {
    const r = document.createRange();
    r.setStart(paren.firstChild, 1); r.setEnd(paren.firstChild, 2);
    out.push(['advice', r.getBoundingClientRect().left - strong.getBoundingClientRect().right]);
  }
  for (const p of document.querySelectorAll('#explanation .view p')) {  // "<name> (87%)", "<name> 40%, <name> 30%"
    const text = p.firstChild;
    for (const m of text.data.matchAll(/(שתיים|واحد|שלוש)\u2069? \(?[0-9]/g)) {  // the test's names
      const end = m.index + m[0].length, name = document.createRange(), number = document.createRange();
      name.setStart(text, m.index); name.setEnd(text, m.index + m[1].length);
      number.setStart(text, end - 1); number.setEnd(text, end);
      out.push([p.textContent, number.getBoundingClientRect().left - name.getBoundingClientRect().right]);
    }
  }
  return out;
}"""


# right-to-left class names leave the numbers beside them in place for a participant: the AI's confidence and each
# class's probability are drawn right of the name ("(87%) <name>" before), as in actclust's own views
@pytest.mark.slow
def test_right_to_left_class_names_for_participants(tmp_path, study_source):
    chromium, sync_playwright = chromium_playwright()
    names = ["שתיים", "واحد", "שלוש"]
    folder = make_study(tmp_path / "s", study_source, items=4, conditions=["full"], class_names=names)
    with LiveStudyServer(folder) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.click("#consent")
            page.wait_for_selector("#trial:not([hidden])")
            found = page.evaluate(_NUMBERS_AFTER_NAMES_JS)
            options = [page.locator("#label option").nth(i).text_content() for i in (1, 2, 3)]
        finally:
            browser.close()
    assert found[0][0] == "advice" and len(found) >= 2, found
    assert all(gap >= 0 for _, gap in found), found
    assert options == names  # a choice alone in its option: as given
