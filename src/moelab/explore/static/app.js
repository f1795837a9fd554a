// moelab explore: the page. Plain JavaScript, no framework, no network beyond this server's /api.
"use strict";

const S = { keyboard: false, info: null, trace: 0, layer: 0, doc: null, tokens: [], focus: -1, live: null, liveLayer: 0,
            diff: null, diffLayer: 0 };
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const num = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(Math.abs(x) < 0.1 ? 2 : 1) + "%");

async function api(path, body) {
  status("loading…");
  const opts = body === undefined ? {} : { method: "POST", body: JSON.stringify(body),
                                          headers: { "Content-Type": "application/json" } };
  const res = await fetch(path, opts);
  const data = await res.json();
  if (!res.ok) { status(data.error || res.statusText, true); throw new Error(data.error); }
  status("");
  return data;
}

function status(text, error = false) {
  const el = $("status");
  el.textContent = text;
  el.className = error ? "error" : "";
}

function traceInfo(i = S.trace) { return S.info.traces[i]; }

// ---- text view --------------------------------------------------------------------------------------
function badge(e) {
  const c = expertColor(Number(e));
  return `<span class="ebadge" style="background:${c.bg};color:${c.fg}">E${esc(e)}</span>`;
}

function renderLegend(numExperts, el = $("legend"), layer = () => S.layer, trace = () => S.trace) {
  el.innerHTML = "";
  for (let e = 0; e < numExperts; e++) {
    const c = expertColor(e);
    const b = document.createElement("span");
    b.className = "swatch";
    b.textContent = e;
    b.title = `expert ${e}: click to open the expert view`;
    b.dataset.expert = e;
    b.style.background = c.bg;
    b.style.color = c.fg;
    if (trace === null) { b.title = `expert ${e}`; el.appendChild(b); continue; }  // the live model has no trace
    b.addEventListener("click", () => { S.trace = trace(); $("trace-select").value = S.trace; openExpert(layer(), e); });
    el.appendChild(b);
  }
}

// A newline token in an inline-block is an empty box two lines tall (or a sliver): it is shown as ↵ and
// breaks the line as an inline box, so the text keeps its shape and the token stays visible and clickable.
function setTokenText(span, text) {
  const s = String(text);
  if (s.includes("\n")) {
    span.classList.add("nl");
    span.textContent = s.replace(/\n/g, "↵\n");
  } else {
    span.textContent = s;
  }
}

// The router's margin at a layer: probability of the first choice minus the second (top-1: the first's).
// Only the top-k probabilities are stored, so the full distribution's entropy is not available from a trace.
function marginOf(t, layer) {
  const p = t.probs && t.probs[layer];
  if (!p || p[0] === null || p[0] === undefined) return null;
  return p.length > 1 && p[1] !== null ? p[0] - p[1] : p[0];
}

function marginColor(m) {  // 0 (a near tie): saturated orange; 1 (certain): white
  const c = Math.max(0, Math.min(1, m));
  return `hsl(30 95% ${(55 + 45 * c).toFixed(1)}%)`;
}

// The router's entropy at a layer, H = -sum p ln p over all E experts (nats): white at 0 (one expert takes
// everything), deep blue at ln E (uniform). Only a trace with the full distribution (`probs`) has it.
function entropyColor(h, E) {
  const c = Math.max(0, Math.min(1, h / Math.log(E)));
  return `hsl(215 85% ${(98 - 48 * c).toFixed(1)}%)`;
}

// Why the entropy colouring is not offered for a trace; null when it is.
function entropyUnavailable(info) {
  if (info.distribution === "full") return null;
  if (info.distribution === "topn") return `this trace stores only the top ${info.topn} router probabilities of each ` +
    "token, not the full distribution the entropy needs; trace with --probs full";
  return "this trace stores no full router distribution; trace with --probs full";
}

function colourControls() {
  const info = traceInfo(), why = entropyUnavailable(info);
  const opt = $("colour-by").querySelector("option[value='entropy']");
  opt.disabled = why !== null;
  opt.title = why || "";
  if (why !== null && S.colourBy === "entropy") { S.colourBy = "expert"; $("colour-by").value = "expert"; }
  $("colour-note").hidden = why === null;
  $("colour-note").textContent = why === null ? "" : `Entropy colouring: ${why}.`;
}

function colourLegend() {
  const el = $("colour-legend"), E = traceInfo().num_experts[S.layer];
  el.hidden = S.colourBy !== "margin" && S.colourBy !== "entropy";
  $("legend").hidden = !el.hidden;
  if (S.colourBy === "margin") {
    el.innerHTML = `router margin p1 − p2 at this layer: <span class="swatch" style="background:${marginColor(0)}">0</span> ` +
      `near tie … <span class="swatch" style="background:${marginColor(1)}">1</span> certain`;
  } else if (S.colourBy === "entropy") {
    el.innerHTML = `router entropy at this layer, H = −Σ p ln p over all ${esc(E)} experts, in nats: ` +
      `<span class="swatch" style="background:${entropyColor(0, E)}">0</span> one expert … ` +
      `<span class="swatch" style="background:${entropyColor(Math.log(E), E)}">${Math.log(E).toFixed(2)}</span> ` +
      `= ln ${esc(E)}, uniform (probabilities normalised to sum 1)`;
  }
}

function renderTokens(area, tokens, layer, onFocus, classFor, rankKnown = true) {
  area.innerHTML = "";
  tokens.forEach((t, i) => {
    const span = document.createElement("span");
    span.className = "tok";
    span.tabIndex = i === 0 ? 0 : -1;  // one tab stop for the whole text; arrow keys move within it
    if (i === 0) span.setAttribute("elementtiming", area.id + "-first");  // when its text is painted (bench --browser)
    span.dataset.i = i;
    setTokenText(span, t.text);
    const e = t.experts[layer][0];
    const m = marginOf(t, layer);
    const h = t.entropy ? t.entropy[layer] : null;
    if (S.colourBy === "margin" && area.id === "token-area") {
      span.dataset.margin = m === null ? "" : m.toFixed(4);
      if (m !== null) { span.style.background = marginColor(m); span.style.color = "#000"; }
    } else if (S.colourBy === "entropy" && area.id === "token-area") {
      span.dataset.entropy = h === null || h === undefined ? "" : h.toFixed(4);
      if (h !== null && h !== undefined) {
        span.style.background = entropyColor(h, traceInfo().num_experts[layer]);
        span.style.color = "#000";
      }
    } else if (e !== null && e !== undefined && rankKnown) {
      span.dataset.expert = e;
      const c = expertColor(e);
      span.style.background = c.bg;
      span.style.color = c.fg;
    }
    if (t.dropped && t.dropped[layer].some((d) => d)) span.classList.add("dropped");
    if (t.part) { span.classList.add("part"); span.title = "first byte(s) of the character in the next token"; }
    if (classFor) classFor(span, t, i);
    // Re-drawing the text under a resting pointer fires mouseenter without any movement: only a pointer
    // that really moved since the last key may take over the path panel.
    span.addEventListener("mouseenter", () => { if (!S.keyboard) onFocus(i); });
    span.addEventListener("focus", () => {
      area.querySelectorAll('.tok[tabindex="0"]').forEach((el) => { el.tabIndex = -1; });
      span.tabIndex = 0;
      onFocus(i);
    });
    area.appendChild(span);
  });
}

function pathTable(t, layer) {
  const K = t.experts[0].length;
  let head = "<tr><th>layer</th>";
  for (let k = 0; k < K; k++) head += `<th>#${k + 1}</th><th>weight</th><th>prob</th>`;
  let rows = "";
  t.experts.forEach((ex, l) => {
    rows += `<tr data-layer="${l}"${l === layer ? ' class="cur"' : ""}><td>${l === layer ? "▶ " : ""}${l}</td>`;
    ex.forEach((e, k) => {
      const dropped = t.dropped[l][k];
      rows += `<td data-rank="${k}" data-expert="${esc(e)}">${badge(e)}</td>` +
              `<td data-rank="${k}" class="w${dropped ? " drop" : ""}">${dropped ? "dropped" : num(t.weights[l][k])}</td>` +
              `<td data-rank="${k}" class="p">${num(t.probs[l][k])}</td>`;
    });
    rows += "</tr>";
  });
  return `<table class="path"><thead>${head}</tr></thead><tbody>${rows}</tbody></table>`;
}

// ---- the path panel's router distribution: fetched per token (all E probabilities are too many to send
// with every token of a page), kept for the tokens already seen ------------------------------------------
async function tokenDistribution(trace, t) {
  const key = `${trace}:${t.seq}:${t.pos}`;
  S.dists = S.dists || new Map();
  if (!S.dists.has(key)) {
    if (S.dists.size > 2000) S.dists.clear();
    const res = await fetch(`/api/token?trace=${trace}&seq=${t.seq}&pos=${t.pos}`);
    const data = await res.json();
    if (!res.ok) throw new Error(data.error || res.statusText);
    S.dists.set(key, data);
  }
  return S.dists.get(key);
}

function bars(values, experts, chosen, width) {
  const top = Math.max(...values, 1e-9);
  return values.map((p, i) => {
    const e = experts[i], c = expertColor(e);
    return `<span class="bar${chosen.includes(e) ? " chosen" : ""}" data-expert="${esc(e)}" data-p="${esc(p)}" ` +
      `title="expert ${esc(e)}: ${num(p, 4)}" style="width:${width}px;height:${Math.max(1, Math.round(40 * p / top))}px;` +
      `background:${c.bg}"></span>`;
  }).join("");
}

function distributionHTML(d, t, layer) {
  if (d.distribution === "none") return `<p class="hint" id="dist-none">Router distribution: ${esc(entropyUnavailable(d))}.</p>`;
  const rows = d.layers.map((x) => {
    const E = d.num_experts[x.layer], chosen = t.experts[x.layer] || [];
    let body, label;
    if (x.probs) {
      body = bars(x.probs, x.probs.map((_, e) => e), chosen, Math.max(1, Math.min(6, Math.floor(300 / E))));
      label = `H = ${num(x.entropy, 3)} nats`;
    } else if (x.topn) {
      body = bars(x.topn.probs, x.topn.experts, chosen, 8);
      label = `top ${x.topn.probs.length} of ${E}`;
    } else {  // another writer may leave a layer's list null: that layer alone has nothing to draw
      body = "";
      label = "not stored at this layer";
    }
    return `<div class="dist${x.layer === layer ? " cur" : ""}" data-layer="${esc(x.layer)}"><span class="dl">layer ${esc(x.layer)} · ` +
      `<span class="h" data-entropy="${x.entropy ?? ""}">${label}</span></span><span class="bars">${body}</span></div>`;
  }).join("");
  const note = d.distribution === "topn" ?
    `Only the top ${esc(d.topn)} probabilities are stored (traced with --probs top:${esc(d.topn)}); the rest of the ` +
    "distribution is not stored, so no entropy is given." :
    "All E router probabilities per layer (bar height ∝ p, outlined: the token's chosen experts); H = −Σ p ln p in " +
    "nats, the probabilities normalised to sum 1.";
  return `<h3>Router distribution</h3>${rows}<p class="hint" id="dist-note">${note}</p>`;
}

async function showDistribution(panel, trace, t, layer) {
  const box = document.createElement("div");
  box.id = "dist-box";
  panel.appendChild(box);
  if (traceInfo(trace).distribution === "none") { box.innerHTML = distributionHTML({ distribution: "none" }); return; }
  try {
    const d = await tokenDistribution(trace, t);
    if (box.isConnected) box.innerHTML = distributionHTML(d, t, layer);  // the panel may show another token by now
  } catch (err) {
    if (box.isConnected) box.innerHTML = `<p class="hint error">router distribution: ${esc(err.message || err)}</p>`;
  }
}

function showPath(panel, t, layer, trace = null) {
  panel.innerHTML = `<h2>Path of <code>${esc(JSON.stringify(t.text))}</code></h2>` +
    `<p class="hint">token id ${esc(t.token ?? "–")} · seq ${esc(t.seq)} · pos ${esc(t.pos)} · doc pos ${esc(t.doc_pos)}` +
    `${t.turn >= 0 ? " · turn " + esc(t.turn) : ""}</p>` + pathTable(t, layer) +
    `<p class="hint">#1, #2, … = the token's choices in rank order; weight = combine weight applied; prob = router ` +
    `probability; "dropped" = the choice found its expert full (weight 0).</p>`;
  if (trace !== null) showDistribution(panel, trace, t, layer);
}

function focusToken(i) {
  if (i < 0 || i >= S.tokens.length) return;
  S.focus = i;
  document.querySelectorAll("#token-area .tok.sel").forEach((el) => el.classList.remove("sel"));
  const span = $("token-area").children[i];
  span.classList.add("sel");
  showPath($("path-panel"), S.tokens[i], S.layer, S.trace);
  saveState();
}

function setLayer(l) {
  const L = traceInfo().layers;
  S.layer = Math.max(0, Math.min(L - 1, l));
  $("layer-slider").value = S.layer;
  $("layer-label").textContent = S.layer;
  saveState();
  renderLegend(traceInfo().num_experts[S.layer]);
  colourControls();
  colourLegend();
  const known = traceInfo().rank_order !== "unknown";
  renderTokens($("token-area"), S.tokens, S.layer, focusToken, null, known);
  $("rank-note").hidden = known;
  $("rank-note").textContent = known ? "" : "This trace's rank order is unknown (its source stores each token's " +
    "experts as a set, e.g. a Megatron import): tokens are not coloured by a top-1 expert, and #1, #2, … in the " +
    "path are storage order, not rank.";
  if (S.focus >= 0) {
    focusToken(S.focus);
  }
}

function tokenKeys(ev, count, getFocus, moveTo, changeLayer, enter) {
  S.keyboard = true;
  const i = getFocus();
  const moves = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: count - 1 };
  if (ev.key in moves) {
    ev.preventDefault();
    moveTo(Math.max(0, Math.min(count - 1, moves[ev.key])));
  } else if (ev.key === "ArrowUp" || ev.key === "ArrowDown") {
    ev.preventDefault();
    changeLayer(ev.key === "ArrowUp" ? 1 : -1);
  } else if (ev.key === "Enter" && enter) {
    ev.preventDefault();
    enter();
  }
}

async function loadDocs(offset = 0) {
  const p = new URLSearchParams({ trace: S.trace, domain: $("f-domain").value, lang: $("f-lang").value,
                                  turn: $("f-turn").value, q: $("f-q").value, offset });
  const data = await api("/api/docs?" + p);
  S.docOffset = data.offset;
  S.docTotal = data.total;
  const last = data.offset + data.docs.length;
  $("doc-count").textContent = `${data.total} document(s)` +
    (data.total > data.docs.length ? `, ${data.total ? data.offset + 1 : 0}-${last} shown` : "");
  $("doc-prev").disabled = data.offset === 0;
  $("doc-next").disabled = last >= data.total;
  for (const [names, id] of [[data.domains, "f-domain"], [data.langs, "f-lang"]]) {
    const sel = $(id);
    if (sel.length === 1) for (const name of names) sel.add(new Option(name, name));
  }
  const list = $("doc-list");
  list.innerHTML = "";
  for (const d of data.docs) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.textContent = `doc ${d.doc} · ${d.tokens} tok · ${d.domain}/${d.lang}`;
    b.dataset.doc = d.doc;
    b.classList.toggle("current", d.doc === S.doc);  // the text may have come first
    b.addEventListener("click", () => openDoc(d.doc));
    li.appendChild(b);
    list.appendChild(li);
  }
  if (S.doc === null && data.docs.length) openDoc(data.docs[0].doc);
}

// A page of a document is asked for in two parts: its first FIRST_TOKENS tokens, painted at once, then
// the rest of the page (up to info.page_tokens in all), which re-draws the text when it comes.
const FIRST_TOKENS = 256;

async function openDoc(doc, start = 0, focusPos = null) {
  const ticket = (S.docTicket = (S.docTicket || 0) + 1);
  const pageSize = S.info.page_tokens;
  const url = (from, limit) => `/api/doc?trace=${S.trace}&doc=${doc}&start=${from}&limit=${limit}`;
  const data = await api(url(start, Math.min(FIRST_TOKENS, pageSize)));
  if (ticket !== S.docTicket) return;  // a later document was asked for meanwhile
  S.doc = doc;
  S.start = start;
  S.pageSize = pageSize;
  showPage(doc, start, data.tokens, data.truncated && FIRST_TOKENS >= pageSize, focusPos);
  if (data.truncated && FIRST_TOKENS < pageSize) {
    const rest = await api(url(data.tokens[data.tokens.length - 1].doc_pos + 1, pageSize - data.tokens.length));
    if (ticket !== S.docTicket) return;
    const user = S.focus >= 0 && S.tokens[S.focus] && document.activeElement === $("token-area").children[S.focus];
    showPage(doc, start, data.tokens.concat(rest.tokens), rest.truncated, user ? S.tokens[S.focus].doc_pos : focusPos, !user);
  }
}

function showPage(doc, start, tokens, truncated, focusPos, scroll = true) {
  const pageSize = S.pageSize;
  // a long document comes in pages of pageSize tokens
  $("tok-pager").hidden = !(truncated || start > 0);
  $("tok-prev").disabled = start === 0;
  $("tok-next").disabled = !truncated;
  $("tok-range").textContent = tokens.length ? `tokens ${tokens[0].doc_pos}–${tokens[tokens.length - 1].doc_pos}` : "";
  $("tok-prev").onclick = () => openDoc(doc, Math.max(0, start - pageSize));
  $("tok-next").onclick = () => openDoc(doc, tokens[tokens.length - 1].doc_pos + 1);
  S.tokens = tokens;
  S.focus = -1;
  $("d-doc").value = doc;
  document.querySelectorAll("#doc-list button").forEach((b) => b.classList.toggle("current", +b.dataset.doc === doc));
  setLayer(S.layer);
  $("path-panel").innerHTML = `<h2>Path</h2><p class="hint">Hover or focus a token.</p>`;
  const at = focusPos === null || focusPos === undefined ? -1 : S.tokens.findIndex((t) => t.doc_pos === focusPos);
  if (at >= 0) {
    $("token-area").children[at].focus({ preventScroll: true });
    if (scroll) $("token-area").children[at].scrollIntoView({ block: "center" });
  }
  saveState();
}

// The text view at one place: the page of the document holding doc_pos, that token focused, the layer set.
async function openPlace(doc, docPos, layer) {
  selectView("text");
  S.layer = layer;
  const page = S.pageSize || S.info.page_tokens;  // the server's page, before any text was opened
  await openDoc(doc, docPos - (docPos % page), docPos);
}

function fillLabels() {
  const t = traceInfo();
  $("f-domain").length = 1;  // refilled from the document index by loadDocs
  $("f-lang").length = 1;
  $("layer-slider").max = t.layers - 1;
  $("x-layer").max = t.layers - 1;
  $("d-layer").max = t.layers - 1;
}

// ---- expert view ------------------------------------------------------------------------------------
function shareTable(title, rows) {
  let body = rows.map((r) => `<tr><td>${esc(r.group)}</td><td>${esc(r.rows)}</td><td>${esc(r.count)}</td>` +
    `<td class="${r.outside ? "out" : ""}">${pct(r.share)} [${pct(r.share_lo)}, ${pct(r.share_hi)}]</td><td>${pct(r.null)} [${pct(r.null_lo)}, ${pct(r.null_hi)}]</td>` +
    `<td>${num(r.lift, 2)}</td></tr>`).join("");
  return `<h3>${title}</h3><table><thead><tr><th>${title}</th><th>rows</th><th>to expert</th><th>share (95% over seqs)</th>` +
    `<th>null (95%)</th><th>lift</th></tr></thead><tbody>${body}</tbody></table>`;
}

function tokenTable(title, rows, contexts) {
  const body = rows.map((r) => {
    const ctx = (contexts && contexts[r.token]) || [];
    const sep = S.info.tokenizer ? "" : " ";
    // each context opens its place in the text view: the document, the page holding it, the token focused
    const shown = ctx.map((c) => `<a class="ctx" href="#" data-doc="${esc(c.doc)}" data-doc-pos="${esc(c.doc_pos)}" ` +
      `title="open doc ${esc(c.doc)} at position ${esc(c.doc_pos)} (seq ${esc(c.seq)}, pos ${esc(c.pos)})">` +
      `${c.text.map((s, i) => (i === c.at ? `<mark>${esc(s)}</mark>` : esc(s))).join(sep)}</a>`).join("");
    const label = S.info.tokenizer ? `<code>${esc(JSON.stringify(r.text))}</code> #${esc(r.token)}` : `#${esc(r.token)}`;
    return `<tr><td>${label}${shown}</td><td>${esc(r.count)}</td><td>${esc(r.occurrences)}</td>` +
           `<td>${pct(r.share)}</td><td>${num(r.lift, 2)}</td></tr>`;
  }).join("");
  return `<h3>${title}</h3><table><thead><tr><th>token</th><th>to expert</th><th>occurrences</th>` +
    `<th title="occurrences whose top-k holds this expert">share of occurrences</th><th>lift</th></tr></thead><tbody>${body}</tbody></table>`;
}

// A view being loaded or that failed shows that, never the previous answer under the new request's controls.
function placeholder(ids, text, error = false) {
  for (const id of ids) {
    const p = document.createElement("p");
    p.className = error ? "hint error" : "hint";
    p.textContent = text;
    $(id).replaceChildren(p);
  }
}

async function guarded(ids, load) {
  placeholder(ids, "loading…");
  try {
    await load();
  } catch (err) {
    placeholder(ids, "error: " + (err.message || err), true);  // the status bar says it too
  }
}

async function loadOverview(trace) {
  if (S.loadFor === trace) return;
  let d = await api(`/api/load?trace=${trace}`);
  while (d.pending) {
    await new Promise((r) => setTimeout(r, 1000));
    d = await api(`/api/load?trace=${trace}`);
  }
  S.loadFor = trace;
  const table = document.createElement("table");
  table.className = "load";
  for (const row of d.layers) {
    const tr = table.insertRow();
    tr.dataset.layer = row.layer;
    const th = document.createElement("th");
    th.textContent = `layer ${row.layer}`;
    tr.appendChild(th);
    for (const x of row.experts) {
      const td = tr.insertCell();
      td.dataset.expert = x.expert;
      td.textContent = x.dead ? "dead" : pct(x.share);
      td.title = `expert ${x.expert}: ${x.count} choices, ${pct(x.share)} (uniform ${pct(row.uniform)})`;
      td.className = x.dead ? "dead" : x.share > 2 * row.uniform ? "hot" : x.share < row.uniform / 2 ? "cold" : "";
      td.addEventListener("click", () => openExpert(row.layer, x.expert));
    }
  }
  $("load-overview").replaceChildren(table);
}

function openExpert(layer, e) {
  $("x-layer").value = layer;
  $("x-expert").value = e;
  selectView("expert");
  loadOverview(S.trace).catch(() => {});
  // A ticket per request: an earlier expert's answer that arrives late must not replace the later one's.
  const ticket = (S.expertTicket = (S.expertTicket || 0) + 1);
  return guarded(["expert-body"], () => loadExpert(layer, e, ticket));
}

async function loadExpert(layer, e, ticket) {
  const stale = () => ticket !== S.expertTicket;
  let d = await api(`/api/expert?trace=${S.trace}&layer=${layer}&expert=${e}`);
  while (d.pending && !stale()) {  // the expert summaries are still being built by one pass over the trace
    status(`building the expert summaries: ${pct(d.progress)}`);
    await new Promise((r) => setTimeout(r, 1000));
    d = await api(`/api/expert?trace=${S.trace}&layer=${layer}&expert=${e}`);
  }
  if (stale()) return;
  const co = d.coactivation.slice(0, 12).map((r) => `<tr><td>${badge(r.expert)}</td><td>${esc(r.count)}</td>` +
    `<td>${num(r.expected, 1)}</td><td>${num(r.ratio, 2)}</td></tr>`).join("");
  $("expert-body").innerHTML =
    `<h2 id="expert-title">Layer ${esc(d.layer)}, expert ${badge(d.expert)}: ${esc(d.count)} of ${esc(d.rows)} choices (${pct(d.share)})</h2>` +
    `<p class="hint">Counts are choices before dropping, all ranks. <b>Null:</b> the expert's overall load share at this layer ` +
    `(${pct(d.share)}) &mdash; what every group would show if its label were shuffled over the layer's rows, which keeps the ` +
    `expert's load; its bracket is that shuffle's 95% range for a group of that size. Bold shares fall outside it. ` +
    `A share's own bracket is its 95% interval over sequences (sequence-clustered standard error). ` +
    `Lift = share / null.</p>` +
    `<div class="grid2"><div>${shareTable("domain", d.by.domain)}</div><div>${shareTable("lang", d.by.lang)}</div>` +
    `<div>${shareTable("position", d.by.position)}</div>` +
    `<div><h3>co-activated experts</h3><p class="hint">Chosen for the same token at this layer. Expected keeps every ` +
    `expert's load: tokens of this expert × (k−1) × the other expert's share of the remaining choices.</p>` +
    `<table><thead><tr><th>expert</th><th>together</th><th>expected</th><th>ratio</th></tr></thead><tbody>${co}</tbody></table></div>` +
    `<div>${tokenTable("most frequent tokens", d.tokens.frequent)}</div>` +
    `<div>${tokenTable("highest-lift tokens (≥ 10 rows)", d.tokens.lift, d.contexts)}</div></div>` +
    ablationText(d.ablation) +
    (d.basis === "summary" ? "" : `<p class="hint" id="expert-basis">Counted from the ${d.basis === "index" ? "in-memory routing index" :
      "trace's rows"} while the summaries are built (${pct(d.progress)}): the same numbers.</p>`);
  addCsvButtons($("expert-body"), `layer${layer}-expert${e}`);
  $("expert-body").querySelectorAll("a.ctx").forEach((a) => a.addEventListener("click", (ev) => {
    ev.preventDefault();
    openPlace(+a.dataset.doc, +a.dataset.docPos, layer);
  }));
}

function ablationText(rows) {
  if (!rows || !rows.length) return `<p class="hint">Ablation effect: not measured for this trace (moelab intervene, then --interventions).</p>`;
  const items = rows.map((a) => `<li id="ablation">removing it from block ${esc(a.block)}'s selection changes the loss by ` +
    `<b>${num(a.mean, 4)}</b> nats/token [${num(a.lo, 4)}, ${num(a.hi, 4)}], p ${num(a.p, 3)}, Holm p ${num(a.p_holm, 3)} ` +
    `<span class="hint">(${esc(a.file)})</span></li>`).join("");
  return `<h3>ablation effect</h3><p class="hint">95% bootstrap interval over sequences; null: no change ` +
    `(sign-flip test on per-sequence means); Holm across every ablation of that run.</p><ul>${items}</ul>`;
}

// ---- diff view --------------------------------------------------------------------------------------
function diffWhat(x) {
  const drops = (d) => (d.length ? d.map(esc).join(",") : "none");
  return [x.set_changed && "set", x.top1_changed && "top-1",
          x.drop_changed && `drops (A: ${drops(x.dropped_a)}; B: ${drops(x.dropped_b)})`].filter(Boolean).join(", ");
}

function diffPanel(t) {
  const rows = t.layers.map((x, l) => `<tr data-layer="${l}"${x.changed ? ' class="out"' : ""}><td>${l}</td>` +
    `<td>${x.a.map(badge).join(" ")}</td><td>${num(x.margin_a)}</td><td>${x.b.map(badge).join(" ")}</td>` +
    `<td>${num(x.margin_b)}</td><td>${diffWhat(x)}</td></tr>`).join("");
  $("diff-panel").innerHTML = `<h3>Token <code>${esc(JSON.stringify(t.text))}</code> (seq ${esc(t.seq)}, pos ${esc(t.pos)})</h3>` +
    `<table><thead><tr><th>layer</th><th>A experts</th><th>A margin</th><th>B experts</th><th>B margin</th>` +
    `<th>changed</th></tr></thead><tbody>${rows}</tbody></table>`;
}

function renderDiff() {
  const d = S.diff, l = S.diffLayer;
  const b = S.info.traces[+$("d-b").value];
  renderLegend(b.num_experts[l], $("diff-legend"), () => S.diffLayer, () => +$("d-b").value);
  const area = $("diff-tokens");
  area.innerHTML = "";
  d.tokens.forEach((t, i) => {
    const span = document.createElement("span");
    const x = t.layers[l];
    span.className = "tok " + (x.changed ? "changed" : "same") + (x.top1_changed ? " top1" : "") +
      (x.drop_changed ? " dropdiff" : "");
    span.tabIndex = 0;
    span.dataset.i = i;
    setTokenText(span, t.text);
    if (x.changed) { const c = expertColor(x.b[0]); span.style.background = c.bg; span.style.color = c.fg; }
    span.title = `A: ${x.a.join(",")} (margin ${num(x.margin_a)})  B: ${x.b.join(",")} (margin ${num(x.margin_b)})`;
    span.addEventListener("mouseenter", () => diffPanel(t));
    span.addEventListener("focus", () => diffPanel(t));
    area.appendChild(span);
  });
  $("diff-summary").innerHTML = "<table><thead><tr><th>layer</th><th>tokens changed</th><th>top-1 changed</th>" +
    "<th>drops changed</th><th>share</th></tr></thead><tbody>" + d.summary.map((s) => `<tr data-layer="${esc(s.layer)}"><td>${esc(s.layer)}</td>` +
    `<td>${esc(s.changed)}</td><td>${esc(s.top1_changed)}</td><td>${esc(s.drop_changed)}</td><td>${pct(s.share)}</td></tr>`).join("") + "</tbody></table>";
  addCsvButtons($("diff-summary"), "diff-summary");
}

function openDiff() {
  S.diff = null;
  return guarded(["diff-tokens", "diff-summary", "diff-panel"], loadDiff);
}

async function loadDiff() {
  S.diff = await api(`/api/diff?a=${$("d-a").value}&b=${$("d-b").value}&doc=${$("d-doc").value}`);
  S.diffLayer = +$("d-layer").value;
  renderDiff();
}

// ---- live view --------------------------------------------------------------------------------------
function focusLive(i) {
  S.liveFocus = i;
  document.querySelectorAll("#live-tokens .tok.sel").forEach((el) => el.classList.remove("sel"));
  $("live-tokens").children[i].classList.add("sel");
  showPath($("live-panel"), S.live.tokens[i], S.liveLayer);
}

function setLiveLayer(l) {
  S.liveLayer = Math.max(0, Math.min(S.live.layers - 1, l));
  $("live-layer").value = S.liveLayer;
  $("live-layer-label").textContent = S.liveLayer;
  renderTokens($("live-tokens"), S.live.tokens, S.liveLayer, focusLive);
  renderLegend(S.live.num_experts[S.liveLayer], $("live-legend"), () => S.liveLayer, null);
}

async function runLive() {
  const text = $("live-text").value;
  const live = await api("/api/live", { text });
  if (text !== $("live-text").value) return;  // a newer prompt is on its way
  S.live = live;
  S.liveFocus = -1;
  $("live-layer").max = S.live.layers - 1;
  $("live-note").textContent = `${S.live.tokens.length} tokens routed by the model (top-${S.live.top_k}).`;
  setLiveLayer(S.liveLayer);
}

// ---- wiring -----------------------------------------------------------------------------------------
function selectView(name) {
  for (const v of ["text", "expert", "diff", "live"]) {
    $("view-" + v).hidden = v !== name;
    $("tab-" + v).setAttribute("aria-selected", v === name ? "true" : "false");
  }
  S.view = name;
  saveState();
}

// ---- export: each table of the expert and diff views downloads as CSV, cell for cell as shown -------------
function tableCSV(table) {
  const cell = (c) => { const t = c.innerText.trim(); return /[",\n]/.test(t) ? '"' + t.replace(/"/g, '""') + '"' : t; };
  return [...table.rows].map((r) => [...r.cells].map(cell).join(",")).join("\n") + "\n";
}

function addCsvButtons(container, name) {
  container.querySelectorAll("table").forEach((table, i) => {
    const b = document.createElement("button");
    b.className = "csv";
    b.textContent = "CSV";
    b.title = "download this table as CSV";
    b.addEventListener("click", () => {
      const a = document.createElement("a");
      a.href = URL.createObjectURL(new Blob([tableCSV(table)], { type: "text/csv" }));
      a.download = `${name}-${i}.csv`;
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 1000);
    });
    table.before(b);
  });
}

// ---- export of the text view as a picture: one box and one label per token, where the page draws them ----
function tokenBoxes(area) {
  const origin = area.getBoundingClientRect();
  return [...area.querySelectorAll(".tok")].map((el) => {
    const r = el.getBoundingClientRect(), cs = getComputedStyle(el);
    return { x: r.left - origin.left, y: r.top - origin.top, w: r.width, h: r.height, text: el.textContent.replace(/\n/g, ""),
             bg: cs.backgroundColor, fg: cs.color };
  });
}

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function exportSVG(area, name) {
  const NS = "http://www.w3.org/2000/svg", box = area.getBoundingClientRect();
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("xmlns", NS);
  svg.setAttribute("width", Math.ceil(box.width));
  svg.setAttribute("height", Math.ceil(box.height));
  svg.setAttribute("font-family", "monospace");
  svg.setAttribute("font-size", "14");
  for (const t of tokenBoxes(area)) {
    const g = document.createElementNS(NS, "g");
    const rect = document.createElementNS(NS, "rect");
    for (const [k, v] of [["x", t.x], ["y", t.y], ["width", t.w], ["height", t.h], ["fill", t.bg]]) rect.setAttribute(k, v);
    const text = document.createElementNS(NS, "text");
    for (const [k, v] of [["x", t.x + 1], ["y", t.y + t.h * 0.75], ["fill", t.fg]]) text.setAttribute(k, v);
    text.setAttribute("xml:space", "preserve");
    text.textContent = t.text;  // as text: the serializer escapes it
    g.append(rect, text);
    svg.appendChild(g);
  }
  download(new Blob([new XMLSerializer().serializeToString(svg)], { type: "image/svg+xml" }), name + ".svg");
}

function exportPNG(area, name) {
  const box = area.getBoundingClientRect(), scale = window.devicePixelRatio || 1;
  const canvas = document.createElement("canvas");
  canvas.width = Math.ceil(box.width * scale);
  canvas.height = Math.ceil(box.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.scale(scale, scale);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, box.width, box.height);
  ctx.font = "14px monospace";
  for (const t of tokenBoxes(area)) {
    ctx.fillStyle = t.bg;
    ctx.fillRect(t.x, t.y, t.w, t.h);
    ctx.fillStyle = t.fg;
    ctx.fillText(t.text, t.x + 1, t.y + t.h * 0.75);
  }
  canvas.toBlob((blob) => download(blob, name + ".png"), "image/png");
}

// ---- URL state: the view, trace, document, layer and expert live in the address's #fragment, so a view
// can be bookmarked and shared (the fragment never reaches the server) ----------------------------------
function saveState() {
  if (S.restoring || !S.info) return;
  const st = { view: S.view || "text", trace: S.trace, layer: S.layer };
  if (S.doc !== null) st.doc = S.doc;
  if (S.doc !== null && S.start) st.start = S.start;
  if (S.focus >= 0 && S.tokens[S.focus]) st.at = S.tokens[S.focus].doc_pos;
  if (S.view === "expert") { st.xl = $("x-layer").value; st.xe = $("x-expert").value; }
  history.replaceState(null, "", "#" + new URLSearchParams(st));
}

function readState() {
  const p = new URLSearchParams(location.hash.slice(1));
  const int = (k) => (/^[0-9]{1,9}$/.test(p.get(k) || "") ? +p.get(k) : null);  // anything else: ignored
  return { view: p.get("view"), trace: int("trace"), doc: int("doc"), layer: int("layer"), xl: int("xl"), xe: int("xe"),
           start: int("start"), at: int("at") };
}

async function restoreState() {
  const st = readState();
  S.restoring = true;
  try {
    if (st.trace !== null && st.trace < S.info.traces.length) { S.trace = st.trace; $("trace-select").value = st.trace; }
    fillLabels();
    if (st.layer !== null) S.layer = Math.min(st.layer, traceInfo().layers - 1);
    // The controls show the bookmarked layer before the text arrives, which paints it.
    $("layer-slider").value = S.layer;
    $("layer-label").textContent = S.layer;
    // The first page of text is asked for at once, beside the document list (whose index takes a scan
    // of the trace): the first paint does not wait for it.
    const doc = st.doc ?? traceInfo().first_doc;
    if (doc !== null && doc !== undefined) S.doc = doc;
    await Promise.all([loadDocs(), S.doc === null ? null : openDoc(S.doc, st.start || 0, st.at)]);
  } finally {
    S.restoring = false;
  }
  if (st.view === "expert" && st.xl !== null && st.xe !== null) await openExpert(st.xl, st.xe);
  else if (["diff", "live"].includes(st.view)) selectView(st.view);
  saveState();
}

async function init() {
  document.addEventListener("mousemove", (ev) => { if (ev.movementX || ev.movementY) S.keyboard = false; });
  S.info = await api("/api/info");
  const sel = $("trace-select");
  S.info.traces.forEach((t, i) => {
    for (const s of [sel, $("d-a"), $("d-b")]) s.add(new Option(`${i}: ${t.name}`, i));
  });
  if (S.info.traces.length > 1) $("d-b").value = 1;
  if (!S.info.live) { $("tab-live").disabled = true; $("tab-live").title = "start with --model for the live view"; }
  document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => selectView(b.dataset.view)));
  sel.addEventListener("change", () => { S.trace = +sel.value; S.doc = null; fillLabels(); loadDocs(); });
  $("f-apply").addEventListener("click", () => loadDocs());
  $("f-q").addEventListener("keydown", (ev) => { if (ev.key === "Enter") loadDocs(); });
  $("doc-prev").addEventListener("click", () => loadDocs(Math.max(0, S.docOffset - 200)));
  $("doc-next").addEventListener("click", () => loadDocs(S.docOffset + 200));
  $("layer-slider").addEventListener("input", (ev) => setLayer(+ev.target.value));
  $("export-svg").addEventListener("click", () => exportSVG($("token-area"), `doc${S.doc}-layer${S.layer}`));
  $("export-png").addEventListener("click", () => exportPNG($("token-area"), `doc${S.doc}-layer${S.layer}`));
  $("colour-by").addEventListener("change", (ev) => { S.colourBy = ev.target.value; setLayer(S.layer); });
  $("show-drops").addEventListener("change", (ev) => $("token-area").classList.toggle("show-drops", ev.target.checked));
  $("token-area").addEventListener("keydown", (ev) => tokenKeys(ev, S.tokens.length, () => S.focus,
    (i) => $("token-area").children[i].focus(), (d) => { setLayer(S.layer + d); if (S.focus >= 0) $("token-area").children[S.focus].focus(); },
    () => openExpert(S.layer, S.tokens[S.focus].experts[S.layer][0])));
  $("x-open").addEventListener("click", () => openExpert(+$("x-layer").value, +$("x-expert").value));
  $("d-open").addEventListener("click", openDiff);
  $("d-layer").addEventListener("input", (ev) => { S.diffLayer = +ev.target.value; $("d-layer-label").textContent = S.diffLayer; if (S.diff) renderDiff(); });
  $("live-run").addEventListener("click", runLive);
  let typing = null;  // route as the prompt is typed: 300 ms after the last keystroke
  $("live-text").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { if ($("live-text").value.trim()) runLive().catch(() => {}); }, 300);
  });
  $("live-layer").addEventListener("input", (ev) => setLiveLayer(+ev.target.value));
  $("live-tokens").addEventListener("keydown", (ev) => tokenKeys(ev, S.live ? S.live.tokens.length : 0, () => S.liveFocus ?? -1,
    (i) => $("live-tokens").children[i].focus(), (d) => { setLiveLayer(S.liveLayer + d); if (S.liveFocus >= 0) $("live-tokens").children[S.liveFocus].focus(); }));
  await restoreState();
}

init().catch((e) => status(String(e.message || e), true));
