// The participant's pages: consent ("/") and trials ("/study"), over the JSON API.
// Everything from the server is put in the page with textContent or as an image's src
// (a data: URI), never as HTML, so class and feature names cannot inject markup.
"use strict";
(function () {
  const KEY = "actclust-study-session";
  const $ = (id) => document.getElementById(id);
  const saved = () => { try { return JSON.parse(localStorage.getItem(KEY)); } catch (e) { return null; } };

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function showError(message) {
    const e = $("error");
    e.textContent = message;
    e.hidden = false;
  }

  async function api(method, path, body) {
    const s = saved();
    const headers = { "Content-Type": "application/json" };
    if (s) headers.Authorization = "Bearer " + s.token;
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      if (s && (r.status === 401 || r.status === 404)) localStorage.removeItem(KEY);  // a session of another study
      throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail || r.status));
    }
    return data;
  }

  function input(rendered) {  // a rendered input: image, feature table or text
    if (rendered.kind === "image") {
      const img = el("img");
      img.src = rendered.src;
      img.alt = "input";
      img.width = rendered.width;
      img.height = rendered.height;
      return img;
    }
    if (rendered.kind === "table") {
      const t = el("table", null, "features");
      for (const [name, value] of rendered.rows) {
        const tr = el("tr");
        tr.append(el("td", name), el("td", value));
        t.append(tr);
      }
      if (rendered.more) t.append(el("caption", "(" + rendered.more + " more features)"));
      return t;
    }
    return el("span", rendered.text);
  }

  function sample(s) {
    const d = el("div", null, "sample");
    d.append(input(s.input), el("span", s.label_name === null ? "AI: " + s.prediction_name : s.label_name));
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
        d.append(el("p", g.name + " (" + Math.round(100 * g.probability) + "%)"), ...g.samples.map(sample));
        return d;
      })));
    }
    if (x.concepts) {
      out.push(view("Concepts: the group each layer puts the input in", x.concepts.map((c) => {
        const d = el("div");
        const mix = c.class_mix.map((m) => m.name + " " + Math.round(100 * m.share) + "%").join(", ");
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
    $("progress").textContent = "Answer " + (t.position + 1) + " of " + t.n_trials;
    $("item").replaceChildren(input(t.item.input));
    const initial = t.stage === "initial";
    $("advice").replaceChildren(...(t.prediction ? [el("span", "The AI predicts: "), el("strong", t.prediction.name),
      el("span", " (confidence " + Math.round(100 * t.prediction.confidence) + "%)")] : []));
    $("explanation").replaceChildren(...explanation(t.explanation));
    $("own").hidden = !initial;
    $("decide").hidden = initial;
    const select = $("label");
    select.replaceChildren(...t.choices.map((c) => { const o = el("option", c.name); o.value = c.class; return o; }));
    $("answer").reset();
    $("submit").disabled = true;
    $("trial").hidden = false;
    window.scrollTo(0, 0);
  }

  async function next() {
    const s = saved();
    const t = await api("GET", "/api/sessions/" + encodeURIComponent(s.session_id) + "/next");
    if (t.done) {
      $("trial").hidden = true;
      $("progress").textContent = "";
      $("code").textContent = t.completion_code;
      $("done").hidden = false;
      return;
    }
    render(t);
  }

  function ready() {
    const f = $("answer");
    const conf = f.querySelector("input[name=confidence]:checked");
    const dec = f.querySelector("input[name=decision]:checked");
    return conf && (current.stage === "initial" || dec);
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
      await api("POST", "/api/sessions/" + encodeURIComponent(s.session_id) + "/responses", body);
      await next();
    } catch (e) {
      showError(e.message);
      $("submit").disabled = false;
    }
  }

  if ($("consent")) {
    if (saved()) $("consent").textContent = "Continue the study";
    $("consent").addEventListener("click", async () => {
      try {
        if (!saved()) localStorage.setItem(KEY, JSON.stringify(await api("POST", "/api/sessions", {})));
        location.href = "/study";
      } catch (e) { showError(e.message); }
    });
  }
  if ($("answer")) {
    if (!saved()) { location.href = "/"; return; }
    $("answer").addEventListener("change", () => { $("submit").disabled = !ready(); });
    $("answer").addEventListener("submit", submit);
    next().catch((e) => showError(e.message));
  }
})();
