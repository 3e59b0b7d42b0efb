"""The HTML results page's stylesheet and script (inlined by :mod:`.html`; no file is loaded at run time).

The script reads two JSON blocks of the page: ``lens-data`` (each value vector's top tokens as indices into
the page's token list, base64) and ``sets-data`` (the neuron sets); it renders the per-layer browser, the token
search, the action-share bars, sortable tables and the episode frame sliders. Tokens are inserted as text.
"""

CSS = """
:root { --fg: #1d2330; --muted: #5d6678; --line: #d8dce4; --act: #c0392b; --set: #fff3c4; --ctl: #e8eefc; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, sans-serif; color: var(--fg); margin: 0; background: #fafbfc; }
header { padding: 16px 24px 8px; background: #fff; border-bottom: 1px solid var(--line); }
header h1 { margin: 0 0 4px; font-size: 20px; }
nav a { margin-right: 14px; }
main { padding: 8px 24px 40px; }
section { margin-top: 22px; }
h2 { font-size: 17px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.note { color: var(--muted); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; background: #fff; margin: 4px 0; }
th, td { border: 1px solid var(--line); padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f0f2f6; }
table.sortable th { cursor: pointer; }
tr.reference td { background: #f4f6fa; font-weight: 600; }
td[data-key="mean"], td[data-key^="p"], td[data-key="sem"], td[data-key="cohen_dz"] {
  font-variant-numeric: tabular-nums; }
.figures { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); padding: 6px; }
figure img { max-width: 720px; width: 100%; display: block; }
figcaption { color: var(--muted); font-size: 12px; }
.controls { margin: 6px 0; }
.controls label { margin-right: 12px; }
.tok { display: inline-block; padding: 0 4px; margin: 1px 2px 1px 0; border-radius: 3px; background: #eef0f4;
       white-space: pre; font-family: ui-monospace, monospace; font-size: 12px; }
.tok.act { background: #fbe3e0; color: var(--act); }
.tok.hit { outline: 2px solid #2c7be5; }
tr.in-set td, .in-set-sample { background: var(--set); }
tr.in-control td { background: var(--ctl); }
.badge { display: inline-block; font-size: 11px; padding: 0 5px; border-radius: 8px; background: #f5d76e;
         margin-right: 3px; }
.badge.control { background: #b9c9f5; }
.bars { display: grid; grid-template-columns: 48px 1fr 120px; gap: 2px 8px; max-width: 720px; font-size: 12px; }
.bar { position: relative; height: 14px; background: #f0f2f6; }
.bar span { position: absolute; left: 0; top: 0; bottom: 0; background: var(--act); opacity: 0.75; }
.bar i { position: absolute; top: -2px; bottom: -2px; width: 0; border-left: 2px dashed #333; }
.episodes { display: flex; flex-wrap: wrap; gap: 14px; }
.episode { background: #fff; border: 1px solid var(--line); padding: 6px; width: 280px; }
.episode img, .episode video { width: 100%; display: block; }
.episode p { margin: 4px 0 0; font-size: 12px; }
.frames img.frame { display: none; }
.frames img.frame.shown { display: block; }
.scrub { width: 100%; }
button.show-set { font: inherit; cursor: pointer; }
.kind-control { color: #3456a8; }
"""

JS = r"""
(function () {
  "use strict";
  var PAGE = 100, MAX_RESULTS = 300;

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // sortable tables: click a header to sort by its column (numbers by value, then text)
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.addEventListener("click", function () {
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        var dir = th.getAttribute("data-dir") === "asc" ? -1 : 1;
        th.setAttribute("data-dir", dir === 1 ? "asc" : "desc");
        rows.sort(function (a, b) {
          var x = a.cells[col].getAttribute("data-value") || a.cells[col].textContent;
          var y = b.cells[col].getAttribute("data-value") || b.cells[col].textContent;
          var nx = parseFloat(x), ny = parseFloat(y);
          if (!isNaN(nx) && !isNaN(ny)) return dir * (nx - ny);
          return dir * x.localeCompare(y);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });

  // episode frame sliders
  Array.prototype.forEach.call(document.querySelectorAll("input.scrub"), function (slider) {
    slider.addEventListener("input", function () {
      var frames = slider.parentNode.querySelectorAll("img.frame");
      Array.prototype.forEach.call(frames, function (img, i) {
        img.classList.toggle("shown", i === Number(slider.value));
      });
    });
  });

  var lens = JSON.parse(document.getElementById("lens-data").textContent);
  var sets = JSON.parse(document.getElementById("sets-data").textContent) || [];
  if (!lens) return;

  var raw = atob(lens.ids), bytes = new Uint8Array(raw.length);
  for (var b = 0; b < raw.length; b++) bytes[b] = raw.charCodeAt(b);
  var ids = lens.dtype === "u16" ? new Uint16Array(bytes.buffer) : new Uint32Array(bytes.buffer);
  var K = lens.k, N = lens.d_mlp, L = lens.num_layers, NTOK = lens.tokens.length;

  // neuron -> sets it belongs to (this lens's stack only)
  var member = {};
  sets.forEach(function (s, i) {
    if (s.stack !== lens.stack) return;
    s.pairs.forEach(function (p) { (member[p[0] + ":" + p[1]] = member[p[0] + ":" + p[1]] || []).push(i); });
  });

  function tokenCell(layer, neuron, hits) {
    var td = el("td"), base = (layer * N + neuron) * K;
    for (var r = 0; r < K; r++) {
      var t = ids[base + r];
      if (t >= NTOK) continue;
      var span = el("span", "tok" + (lens.action[t] ? " act" : "") + (hits && hits[t] ? " hit" : ""),
                    lens.tokens[t]);
      span.title = "rank " + r;
      td.appendChild(span);
    }
    return td;
  }

  function setsCell(layer, neuron) {
    var td = el("td"), mine = member[layer + ":" + neuron] || [];
    mine.forEach(function (i) {
      td.appendChild(el("span", "badge" + (sets[i].kind === "control" ? " control" : ""), sets[i].name));
    });
    return td;
  }

  function neuronRow(layer, neuron, extra, hits) {
    var tr = el("tr"), mine = member[layer + ":" + neuron] || [];
    tr.setAttribute("data-layer", layer);
    tr.setAttribute("data-neuron", neuron);
    if (mine.length) {
      var concept = mine.some(function (i) { return sets[i].kind !== "control"; });
      tr.className = concept ? "in-set" : "in-control";
    }
    tr.appendChild(el("td", "", "L" + layer + " N" + neuron));
    if (extra !== undefined) tr.appendChild(el("td", "", String(extra)));
    tr.appendChild(setsCell(layer, neuron));
    tr.appendChild(tokenCell(layer, neuron, hits));
    return tr;
  }

  function hasAction(layer, neuron) {
    var base = (layer * N + neuron) * K;
    for (var r = 0; r < K; r++) { var t = ids[base + r]; if (t < NTOK && lens.action[t]) return true; }
    return false;
  }

  // the per-layer browser
  var layerSelect = document.getElementById("layer"), body = document.querySelector("#neurons-table tbody");
  var onlySets = document.getElementById("only-sets"), onlyAction = document.getElementById("only-action");
  var pageLabel = document.getElementById("page"), page = 0;
  for (var l = 0; l < L; l++) {
    var opt = el("option", "", "layer " + l + (lens.share[l] !== null ? "  (action share " +
                 lens.share[l].toFixed(3) + ")" : ""));
    opt.value = String(l);
    layerSelect.appendChild(opt);
  }
  function layerNeurons(layer) {
    var out = [];
    for (var n = 0; n < N; n++) {
      if (onlySets.checked && !member[layer + ":" + n]) continue;
      if (onlyAction.checked && !hasAction(layer, n)) continue;
      out.push(n);
    }
    return out;
  }
  function renderLayer() {
    var layer = Number(layerSelect.value), list = layerNeurons(layer);
    var pages = Math.max(1, Math.ceil(list.length / PAGE));
    page = Math.min(Math.max(page, 0), pages - 1);
    body.textContent = "";
    list.slice(page * PAGE, (page + 1) * PAGE).forEach(function (n) { body.appendChild(neuronRow(layer, n)); });
    pageLabel.textContent = "page " + (page + 1) + " / " + pages + " (" + list.length + " vectors)";
  }
  layerSelect.addEventListener("change", function () { page = 0; renderLayer(); });
  onlySets.addEventListener("change", function () { page = 0; renderLayer(); });
  onlyAction.addEventListener("change", function () { page = 0; renderLayer(); });
  document.getElementById("prev").addEventListener("click", function () { page -= 1; renderLayer(); });
  document.getElementById("next").addEventListener("click", function () { page += 1; renderLayer(); });
  var firstSet = sets.filter(function (s) { return s.stack === lens.stack && s.pairs.length; })[0];
  layerSelect.value = String(firstSet ? firstSet.pairs[0][0] : L - 1);
  renderLayer();

  // action-token share per layer, with the chance level
  var share = document.getElementById("share");
  if (lens.has_action) {
    var grid = el("div", "bars"), top = Math.max.apply(null, lens.share.concat([lens.chance || 0, 1e-9]));
    lens.share.forEach(function (s, layer) {
      grid.appendChild(el("span", "", "L" + layer));
      var bar = el("div", "bar"), fill = el("span");
      fill.style.width = (100 * s / top) + "%";
      bar.appendChild(fill);
      if (lens.chance) { var mark = el("i"); mark.style.left = (100 * lens.chance / top) + "%"; bar.appendChild(mark); }
      bar.title = "share " + s.toFixed(4) + ", vectors with an action token " +
                  lens.vectors_with_action[layer].toFixed(3);
      grid.appendChild(bar);
      grid.appendChild(el("span", "", s.toFixed(3)));
    });
    share.appendChild(grid);
    if (lens.chance) share.appendChild(el("p", "note", "dashed: chance = " + lens.chance.toFixed(4) +
                                                       " (the action tokens' share of the vocabulary)"));
  } else {
    share.appendChild(el("p", "note", "This model has no action tokens (no share to show)."));
  }

  // token search: every vector whose top-k holds a matching token
  var input = document.getElementById("search"), substring = document.getElementById("substring");
  var results = document.getElementById("search-results"), count = document.getElementById("search-count");
  function norm(s) { return s.replace(/[\u2581\u0120]/g, " ").trim().toLowerCase(); }
  function showHits(title, rows) {
    var tbody = results.tBodies[0];
    tbody.textContent = "";
    rows.slice(0, MAX_RESULTS).forEach(function (r) { tbody.appendChild(neuronRow(r[0], r[1], r[2], r[3])); });
    results.hidden = rows.length === 0;
    count.textContent = title;
  }
  function search() {
    var q = norm(input.value);
    if (!q) { showHits("", []); return; }
    var wanted = new Uint8Array(NTOK + 1), any = false;
    for (var t = 0; t < NTOK; t++) {
      var w = lens.words[t], rawTok = lens.tokens[t].toLowerCase();
      if (w === q || rawTok === q || (substring.checked && (w.indexOf(q) >= 0 || rawTok.indexOf(q) >= 0))) {
        wanted[t] = 1; any = true;
      }
    }
    var rows = [];
    if (any) {
      for (var i = 0; i < ids.length; i += K) {
        for (var r = 0; r < K; r++) {
          if (wanted[ids[i + r]]) { var v = i / K; rows.push([Math.floor(v / N), v % N, r, wanted]); break; }
        }
      }
    }
    rows.sort(function (a, b) { return a[2] - b[2] || a[0] - b[0] || a[1] - b[1]; });
    showHits(rows.length + " neurons" + (rows.length > MAX_RESULTS ? " (first " + MAX_RESULTS + " shown)" : ""),
             rows);
  }
  var timer = null;
  input.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(search, 150); });
  input.addEventListener("keydown", function (e) { if (e.key === "Enter") { clearTimeout(timer); search(); } });
  substring.addEventListener("change", search);

  // a set's neurons across layers
  Array.prototype.forEach.call(document.querySelectorAll("button.show-set"), function (button) {
    button.addEventListener("click", function () {
      var s = sets[Number(button.getAttribute("data-set"))];
      if (s.stack !== lens.stack) { showHits("set " + s.name + " is on the " + s.stack + " stack", []); return; }
      var rows = s.pairs.filter(function (p) { return p[0] < L && p[1] < N; })
                        .map(function (p) { return [p[0], p[1], "–", null]; });
      showHits("set " + s.name + ": " + rows.length + " neurons", rows);
      results.scrollIntoView({block: "nearest"});
    });
  });
})();
"""
