// The participant's pages: consent ("/") and trials ("/study"), over the JSON API.
// Everything from the server is put in the page with textContent or as an image's src
// (a data: URI), never as HTML, so class and feature names cannot inject markup.
"use strict";
(function () {
  const KEY = "actclust-study-session";
  const $ = (id) => document.getElementById(id);
  const saved = () => { try { return JSON.parse(localStorage.getItem(KEY)); } catch (e) { return null; } };

  // A class name between Unicode's bidirectional isolates (U+2068 ... U+2069): a right-to-left name (Hebrew, Arabic)
  // is laid out on its own and leaves the numbers beside it in place ("(87%) <name>" otherwise), as in actclust's views
  const iso = (name) => "\u2068" + name + "\u2069";

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  // What a participant reads when something fails: what happened and what to do, not the API's wording
  // (trial ids, endpoints), which stays in the console for whoever runs the study.
  function participantMessage(err) {
    if (err.network) return "The study cannot be reached just now. Check your connection and try again in a minute; " +
                            "your answers so far are saved.";
    if (err.status === 401 || err.status === 404) return "This browser's place in the study is no longer known " +
                            "(the study may have been restarted or replaced).";
    if (err.status >= 500) return "Something went wrong on the study's side. Try again in a minute; your answers so " +
                                  "far are saved.";
    return err.message;  // the study is full, too many new sessions: written for participants
  }

  function showError(err) {
    if (err.detail) console.warn(err.detail);
    const e = $("error");
    e.replaceChildren(el("span", participantMessage(err)));
    if (err.status === 401 || err.status === 404) {
      const a = el("a", " Start again from the first page.");
      a.href = "/";
      e.append(a);
    }
    e.hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
    $("error").replaceChildren();
  }

  async function api(method, path, body) {
    const s = saved();
    const headers = { "Content-Type": "application/json" };
    if (s) headers.Authorization = "Bearer " + s.token;
    let r;
    try {
      r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      throw Object.assign(new Error(e.message), { network: true });
    }
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      if (s && (r.status === 401 || r.status === 404)) localStorage.removeItem(KEY);  // a session of another study
      const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail || r.status);
      throw Object.assign(new Error(detail), { status: r.status, detail });
    }
    return data;
  }

  function input(rendered, alt) {  // a rendered input: image, feature table or text
    if (rendered.kind === "image") {
      const img = el("img");
      img.src = rendered.src;
      img.alt = alt || "the input";
      img.width = rendered.width;
      img.height = rendered.height;
      return img;
    }
    if (rendered.kind === "table") {
      // rows in the item's feature order (the server's); the first few shown, the others open on a click
      const rows = rendered.rows;
      const shown = (current && current.item.features_shown) || rows.length;
      const table = (part) => {
        const t = el("table", null, "features");
        for (const [name, value] of part) {
          const tr = el("tr");
          const n = el("td", name);
          n.title = name;  // a long name is cut short on the page
          tr.append(n, el("td", value));
          t.append(tr);
        }
        return t;
      };
      const t = table(rows.slice(0, shown));
      const unlisted = rendered.more ? "(" + rendered.more + " more features not listed)" : null;
      if (rows.length <= shown) {
        if (unlisted) t.append(el("caption", unlisted));
        return t;
      }
      const fold = el("details", null, "more-features");
      const rest = table(rows.slice(shown));
      if (unlisted) rest.append(el("caption", unlisted));
      fold.append(el("summary", (rows.length - shown + (rendered.more || 0)) + " more features"), rest);
      const box = el("div", null, "feature-table");
      box.append(t, fold);
      return box;
    }
    return el("span", rendered.text);
  }

  function sample(s) {
    const d = el("div", null, "sample");
    const name = s.label_name === null ? "AI: " + iso(s.prediction_name) : iso(s.label_name);
    d.append(input(s.input, "training example: " + name), el("span", name));
    return d;
  }

  function view(title, children) {
    const v = el("div", null, "view");
    v.append(el("h3", title), ...children);
    return v;
  }

  function explanation(x) {
    const out = [];
    if (!x) return out;
    if (x.similar) out.push(view("Training examples the AI finds similar", x.similar.map(sample)));
    if (x.similar_multiclass) {
      out.push(view("Similar training examples of the AI's three most likely classes", x.similar_multiclass.map((g) => {
        const d = el("div");
        d.append(el("p", iso(g.name) + " (" + Math.round(100 * g.probability) + "%)"), ...g.samples.map(sample));
        return d;
      })));
    }
    if (x.concepts) {
      out.push(view("Concepts: the group each layer puts the input in", x.concepts.map((c) => {
        const d = el("div");
        const mix = c.class_mix.map((m) => iso(m.name) + " " + Math.round(100 * m.share) + "%").join(", ");
        d.append(el("p", c.layer + ", group " + c.cluster + ": " + mix), ...c.exemplars.map(sample));
        return d;
      })));
    }
    if (x.trust) {
      const lines = [el("p", x.trust.surrogate_agrees ? "The clusters agree with the AI's prediction."
                                                      : "The clusters disagree with the AI's prediction.")];
      for (const [k, v] of Object.entries(x.trust.signals)) lines.push(el("p", k + ": " + Number(v).toFixed(2)));
      out.push(view("Trust signals", lines));
    }
    return out;
  }

  let current = null;

  function render(t) {
    current = t;
    hideError();
    $("progress").textContent = "Question " + (t.position + 1) + " of " + t.n_trials;
    $("item").replaceChildren(input(t.item.input, "the input to judge"));
    const initial = t.stage === "initial";
    $("own-answer").replaceChildren(...(t.own ? [el("span", "Your answer: "), el("strong", iso(t.own.name)),
      el("span", " (Reject keeps it; Accept takes the AI's instead)")] : []));
    $("advice").replaceChildren(...(t.prediction ? [el("span", "The AI predicts: "), el("strong", iso(t.prediction.name)),
      el("span", " (confidence " + Math.round(100 * t.prediction.confidence) + "%)")] : []));
    $("explanation").replaceChildren(...explanation(t.explanation));
    $("own").hidden = !initial;
    $("decide").hidden = initial;
    const select = $("label");
    const none = el("option", "Choose…");  // no class is preselected: an answer left untouched is not an answer
    none.value = "";
    none.disabled = true;
    select.replaceChildren(none, ...t.choices.map((c) => { const o = el("option", c.name); o.value = c.class; return o; }));
    $("answer").reset();
    select.value = "";
    $("submit").disabled = true;
    $("trial").hidden = false;
    window.scrollTo(0, 0);
  }

  async function next() {
    const s = saved();
    const t = await api("GET", "/api/sessions/" + encodeURIComponent(s.session_id) + "/next");
    if (t.done) {
      hideError();
      $("trial").hidden = true;
      $("progress").textContent = "";
      $("progress").hidden = true;
      $("code").textContent = t.completion_code;
      $("done").hidden = false;
      localStorage.setItem(KEY, JSON.stringify({ ...s, completion_code: t.completion_code }));
      return;
    }
    render(t);
  }

  function ready() {
    const f = $("answer");
    const conf = f.querySelector("input[name=confidence]:checked");
    const dec = f.querySelector("input[name=decision]:checked");
    return conf && (current.stage === "initial" ? $("label").value !== "" : dec);
  }

  async function submit(ev) {
    ev.preventDefault();
    if (!current || !ready()) return;
    const f = $("answer");
    const body = { trial_id: current.trial_id, confidence: Number(f.querySelector("input[name=confidence]:checked").value) };
    if (current.stage === "initial") body.label = Number($("label").value);
    else body.decision = f.querySelector("input[name=decision]:checked").value;
    $("submit").disabled = true;
    try {
      const s = saved();
      try {
        await api("POST", "/api/sessions/" + encodeURIComponent(s.session_id) + "/responses", body);
      } catch (e) {
        if (e.status !== 409) throw e;
        // answered already (another tab or window, a double submit): the answer given first stands; go on from it
        await next();
        const note = $("error");
        note.replaceChildren(el("span", "That question had already been answered (in another tab or window?); " +
                                        "the first answer was kept. Here is the next question."));
        note.hidden = false;
        return;
      }
      await next();
    } catch (e) {
      showError(e);
      $("submit").disabled = !ready();
    }
  }

  if ($("consent")) {
    const s = saved();
    if (s && s.completion_code) {  // finished in this browser: nothing to continue
      $("consent").hidden = true;
      $("finished-code").textContent = s.completion_code;
      $("finished").hidden = false;
    } else if (s) $("consent").textContent = "Continue the study";
    $("consent").addEventListener("click", async () => {
      try {
        if (!saved()) localStorage.setItem(KEY, JSON.stringify(await api("POST", "/api/sessions", {})));
        location.href = "/study";
      } catch (e) { showError(e); }
    });
  }
  if ($("answer")) {
    if (!saved()) { location.href = "/"; return; }
    $("answer").addEventListener("change", () => { $("submit").disabled = !ready(); });
    $("answer").addEventListener("submit", submit);
    next().catch(showError);
  }
})();
