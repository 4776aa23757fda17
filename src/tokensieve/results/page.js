/* The interactive tokensieve report (tokensieve.results.page). Reads the JSON of #report-data (aggregated in Python by
   tokensieve.results.page_data), draws it with Plotly, and lets the reader filter methods, hover points and compare
   two configurations. Every string from the store reaches the DOM as text (textContent), never as markup. */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363",
    "#9c9ede", "#e7969c", "#cedb9c", "#e7ba52", "#de9ed6", "#6baed6", "#fd8d3c", "#74c476", "#9e9ac8"];
  var SYMBOLS = {"KV prefill": "circle", "decode": "diamond", "sparse prefill": "square", "learned": "triangle-up",
    "visual": "circle", "reference": "star"};
  var CONFIG = {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"]};
  var state = {search: "", families: {}, off: {}, highlight: null};
  D.families.forEach(function (f) { state.families[f] = true; });
  var plots = [];  // {div, build}: every plot that follows the method picker

  // ------------------------------------------------------------------------------------------------ helpers
  function el(tag, attrs) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "cls") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }
  function num(x, d) { return (x === null || x === undefined || !isFinite(x)) ? "—" : Number(x).toFixed(d); }
  function pct(x, d) { return (x === null || x === undefined || !isFinite(x)) ? "—" : (100 * x).toFixed(d || 0) + "%"; }
  function esc(s) { return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
  function color(mi) { return D.methods[mi].family === "reference" ? "#000" : PALETTE[mi % PALETTE.length]; }
  function symbol(mi) { return SYMBOLS[D.methods[mi].family] || "circle"; }
  function cfg(ci) { return D.configs[ci]; }
  function shown(mi) {
    var m = D.methods[mi];
    if (m.family === "reference") return true;
    if (!state.families[m.family] || state.off[mi]) return false;
    return !state.search || m.name.toLowerCase().indexOf(state.search) >= 0;
  }
  function section(id, title, intro) {
    var s = el("section", {id: id}, el("h2", {text: title}));
    if (intro) s.appendChild(el("p", {cls: "note", text: intro}));
    document.getElementById("main").appendChild(s);
    document.getElementById("nav").appendChild(el("a", {href: "#" + id, text: title}));
    return s;
  }
  function plotDiv(parent, id, cls) {
    var div = el("div", {id: id, cls: "plot " + (cls || "")});
    parent.appendChild(div);
    return div;
  }
  function table(header, body, id) {
    var t = el("table", id ? {id: id} : {});
    var tr = el("tr");
    header.forEach(function (h) { tr.appendChild(el("th", {text: h})); });
    t.appendChild(tr);
    body.forEach(function (row) {
      var r = el("tr");
      row.forEach(function (c) { r.appendChild(el("td", {text: c})); });
      t.appendChild(r);
    });
    return t;
  }
  function fade(hex, alpha) {  // "#rrggbb" → rgba with the given opacity
    var n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16 & 255) + "," + (n >> 8 & 255) + "," + (n & 255) + "," + alpha + ")";
  }
  function errorBars(ys, los, his, colour, visible) {
    return {type: "data", symmetric: false, visible: visible,
      array: ys.map(function (y, i) { return his[i] === null ? 0 : Math.max(0, his[i] - y); }),
      arrayminus: ys.map(function (y, i) { return los[i] === null ? 0 : Math.max(0, y - los[i]); }),
      color: fade(colour, 0.55), thickness: 1, width: 3};
  }
  function paretoFront(pts, higher) {  // [[x, y]] → the points no other beats with less (or equal) x; as stats.pareto_front
    var sign = higher ? 1 : -1, best = -Infinity, front = [];
    pts.slice().sort(function (a, b) { return a[0] - b[0] || sign * (b[1] - a[1]); }).forEach(function (p) {
      if (sign * p[1] > best) { front.push(p); best = sign * p[1]; }
    });
    return front;
  }
  var logFacts = [0];
  function logFact(n) {
    for (var i = logFacts.length; i <= n; i++) logFacts.push(logFacts[i - 1] + Math.log(i));
    return logFacts[n];
  }
  function signTest(wins, losses) {  // exact two-sided sign test, as tokensieve.results.stats.sign_test
    var n = wins + losses;
    if (n === 0) return 1;
    var k = Math.min(wins, losses), terms = [];
    for (var i = 0; i <= k; i++) terms.push(logFact(n) - logFact(i) - logFact(n - i) - n * Math.LN2);
    var top = Math.max.apply(null, terms);
    var sum = terms.reduce(function (s, t) { return s + Math.exp(t - top); }, 0);
    return Math.min(1, 2 * Math.exp(top + Math.log(sum)));
  }
  function react(div, traces, layout) {
    var m = layout.margin || {l: 52, r: 12, t: 34, b: 44};
    layout.margin = {l: m.l, r: m.r, t: m.t, b: m.b};
    layout.hovermode = "closest";
    layout.font = {size: 11};
    if (layout.title) {
      // the title sits just above the axes, below the band of the mode bar (top right), so a long title in a
      // narrow panel is never covered by the bar's buttons
      layout.title.x = 0.01; layout.title.xanchor = "left";
      layout.title.yref = "paper"; layout.title.y = 1; layout.title.yanchor = "bottom"; layout.title.pad = {b: 6};
      layout.margin.t += 22;
    }
    return Plotly.react(div, traces, layout, CONFIG);
  }

  // ---------------------------------------------------------------------------------------------- the picker
  function buildPicker() {
    var box = document.getElementById("picker");
    var kinds = D.methods.filter(function (m) { return m.family !== "reference"; });
    if (!kinds.length) { box.style.display = "none"; return; }
    var search = el("input", {id: "method-search", type: "search", placeholder: "search methods…",
      "aria-label": "search methods"});
    search.addEventListener("input", function () { state.search = search.value.trim().toLowerCase(); update(); });
    box.appendChild(el("h3", {text: "Methods"}));
    box.appendChild(search);
    var fams = el("div", {cls: "families"});
    D.families.forEach(function (f) {
      var count = D.methods.filter(function (m) { return m.family === f; }).length;
      if (!count) return;
      var cb = el("input", {type: "checkbox", "data-family": f});
      cb.checked = true;
      cb.addEventListener("change", function () { state.families[f] = cb.checked; update(); });
      fams.appendChild(el("label", {cls: "family"}, cb, " " + f + " (" + count + ")"));
    });
    box.appendChild(fams);
    var all = el("button", {type: "button", id: "methods-all", text: "all"});
    var none = el("button", {type: "button", id: "methods-none", text: "none"});
    all.addEventListener("click", function () { state.off = {}; syncBoxes(); update(); });
    none.addEventListener("click", function () {
      D.methods.forEach(function (m, i) { if (m.family !== "reference") state.off[i] = true; });
      syncBoxes(); update();
    });
    box.appendChild(el("div", {cls: "buttons"}, all, none, el("span", {id: "methods-count"})));
    var list = el("div", {id: "method-list"});
    D.methods.forEach(function (m, i) {
      if (m.family === "reference") return;
      var cb = el("input", {type: "checkbox", "data-method": String(i)});
      cb.checked = true;
      cb.addEventListener("change", function () { if (cb.checked) delete state.off[i]; else state.off[i] = true; update(); });
      var swatch = el("span", {cls: "swatch"});
      swatch.style.background = color(i);
      var item = el("label", {cls: "method", "data-index": String(i), title: m.name + " (" + m.family + ")"}, cb, swatch, m.name,
        el("small", {text: " " + m.family}));
      item.addEventListener("mouseenter", function () { highlight(i); });
      item.addEventListener("mouseleave", function () { highlight(null); });
      list.appendChild(item);
    });
    box.appendChild(list);
  }
  function syncBoxes() {
    document.querySelectorAll("#method-list input").forEach(function (cb) {
      cb.checked = !state.off[Number(cb.getAttribute("data-method"))];
    });
  }
  function update() {
    var n = 0, total = 0;
    document.querySelectorAll("#method-list .method").forEach(function (item) {
      var i = Number(item.getAttribute("data-index")), on = shown(i);
      item.classList.toggle("hidden", !on);
      total++; if (on) n++;
    });
    var count = document.getElementById("methods-count");
    if (count) count.textContent = n + " of " + total + " shown";
    return Promise.all(plots.map(function (p) { return p.build(); }));
  }
  function highlight(mi) {  // dim every other method's traces while one is pointed at
    if (state.highlight === mi) return;
    state.highlight = mi;
    plots.forEach(function (p) {
      if (!p.div.data) return;
      var op = p.div.data.map(function (t) {
        return mi === null || t.meta === undefined || t.meta === mi || t.meta === "ref" ? 1 : 0.12;
      });
      Plotly.restyle(p.div, {opacity: op});
    });
  }
  function follow(div, build) {
    var p = {div: div, build: build};
    plots.push(p);
    return p;
  }

  // ------------------------------------------------------------------------------------------------ header
  function buildHeader() {
    var c = D.counts, parts = [];
    if (c.eval) parts.push(c.eval + " accuracy rows");
    if (c.bench) parts.push(c.bench + " speed rows");
    if (c.vlm_eval) parts.push(c.vlm_eval + " VLM answers");
    if (c.vlm_bench) parts.push(c.vlm_bench + " VLM speed configurations");
    if (D.daam.runs && D.daam.runs.length) parts.push(D.daam.runs.length + " DAAM runs");
    var head = document.getElementById("summary");
    head.appendChild(el("p", {}, "From ", el("code", {text: D.store}), ": " + parts.join(", ") +
      (D.models.length ? "; model " + D.models.join(", ") : "") +
      (D.versions.length ? "; tokensieve " + D.versions.join(", ") : "") + "."));
    if (D.machine) head.appendChild(el("p", {cls: "note", text: D.machine}));
    if (D.commands.length) {
      head.appendChild(el("details", {}, el("summary", {text: "Commands that filled the store (" + D.commands.length + ")"}),
        el("pre", {text: D.commands.join("\n")})));
    }
  }

  // ------------------------------------------------------------------------------------------------ accuracy
  function accuracyTraces(panel) {
    var byMethod = {}, order = [], full = null, all = [];
    panel.points.forEach(function (p) {
      var c = cfg(p[0]);
      if (c.family === "reference") { full = p; return; }
      if (!shown(c.method) || p[2] === null || p[7] === null) return;
      if (!byMethod[c.method]) { byMethod[c.method] = []; order.push(c.method); }
      byMethod[c.method].push(p);
    });
    order.sort(function (a, b) { return a - b; });
    function hover(p) {
      var c = cfg(p[0]);
      return "<b>" + esc(c.label) + "</b> (" + esc(c.family) + ")<br>budget " + esc(c.budget) +
        "<br>" + (panel.higher ? "accuracy " : "perplexity ") + num(p[2], 3) +
        (p[3] !== null ? " [" + num(p[3], 2) + "–" + num(p[4], 2) + "]" : "") + ", n = " + p[1] +
        "<br>KV kept " + pct(p[7], 1) + " · " + num(p[6], 1) + " MB" +
        "<br>KL " + num(p[5], 3) + " nats · top-1 " + num(p[8], 2);
    }
    var traces = order.map(function (mi) {
      var pts = byMethod[mi].slice().sort(function (a, b) { return a[7] - b[7]; });
      var ys = pts.map(function (p) { return p[2]; });
      pts.forEach(function (p) { all.push([p[7], p[2]]); });
      return {type: "scatter", mode: "lines+markers", name: D.methods[mi].name, meta: mi,
        x: pts.map(function (p) { return p[7]; }), y: ys,
        error_y: errorBars(ys, pts.map(function (p) { return p[3]; }), pts.map(function (p) { return p[4]; }), color(mi),
          panel.higher && pts.every(function (p) { return p[3] !== null; })),
        marker: {color: color(mi), symbol: symbol(mi), size: 7}, line: {color: color(mi), width: 1.2},
        text: pts.map(hover), hovertemplate: "%{text}<extra></extra>"};
    });
    if (full && full[2] !== null) {
      var x = full[7] === null ? 1 : full[7];
      all.push([x, full[2]]);
      traces.push({type: "scatter", mode: "markers", name: "full cache", meta: "ref", x: [x], y: [full[2]],
        error_y: errorBars([full[2]], [full[3]], [full[4]], "#000", panel.higher && full[3] !== null),
        marker: {color: "#000", symbol: "star", size: 14}, text: [hover(full)], hovertemplate: "%{text}<extra></extra>"});
    }
    var front = paretoFront(all, panel.higher);
    if (front.length > 1) {
      traces.push({type: "scatter", mode: "lines", name: "Pareto front", meta: "ref", hoverinfo: "skip",
        x: front.map(function (p) { return p[0]; }), y: front.map(function (p) { return p[1]; }),
        line: {shape: "hv", dash: "dash", color: "#888", width: 1.2}});
    }
    return traces;
  }
  function buildAccuracy() {
    if (!D.kv.length) return;
    var modes = [], tasks = [];
    D.kv.forEach(function (p) {
      if (modes.indexOf(p.mode) < 0) modes.push(p.mode);
      if (tasks.indexOf(p.task) < 0) tasks.push(p.task);
    });
    var s = section("accuracy", "Accuracy vs KV kept",
      "One panel per task and mode; one line per method over its budgets, with 95 % intervals (Wilson for right/wrong " +
      "answers); the star is the full cache, the dashed line the Pareto front of what is shown. KV kept = stored " +
      "entries / the full cache's (decode-time methods keep every entry). Hover a point for its spec, samples, " +
      "interval, KL and bytes; point at a method in the picker to bring it forward.");
    modes.forEach(function (mode) {
      if (modes.length > 1) s.appendChild(el("h3", {text: mode}));
      var grid = el("div", {cls: "grid cols-" + Math.min(3, tasks.length)});
      s.appendChild(grid);
      D.kv.forEach(function (panel, i) {
        if (panel.mode !== mode) return;
        var div = plotDiv(grid, "acc-" + i);
        div.setAttribute("data-task", panel.task);
        div.setAttribute("data-mode", panel.mode);
        follow(div, function () {
          var traces = accuracyTraces(panel);
          return react(div, traces, {
            title: {text: panel.task + " — " + panel.mode, font: {size: 13}}, height: 360,
            showlegend: traces.length <= 12, legend: {font: {size: 9}},
            xaxis: {title: {text: "KV kept (entries / full cache)"}, range: [0, 1.06], tickformat: ".0%"},
            yaxis: panel.higher ? {title: {text: panel.metric}, range: [-0.05, 1.05]}
              : {title: {text: panel.metric + " (lower is better)"}}});
        });
      });
    });
  }

  // ------------------------------------------------------------------------------------------------ speed
  function buildSpeed() {
    var S = D.speed;
    if (!S || !S.rows || !S.rows.length) return;
    var s = section("speed", "Accuracy and speed, side by side",
      "The benchmark's medians per configuration (tokensieve bench), against the full cache of the same run" +
      (S.tasks.length ? ", next to the accuracy of the same label (mean over " + S.tasks.join(", ") + "). " :
        " (the store has no accuracy rows of these labels). ") + "speed-up is " +
      "decode tokens/s against the full cache's; ideal is what the bytes read per step allow at the measured " +
      "bandwidth; TTFT × is the full cache's time to first token over this one's.");
    var controls = el("div", {cls: "controls"});
    var setting = el("select", {id: "speed-setting", "aria-label": "context length and batch"});
    S.settings.forEach(function (st, i) { setting.appendChild(el("option", {value: String(i), text: st[0] + " tokens, batch " + st[1]})); });
    controls.appendChild(el("label", {}, "setting ", setting));
    var mode = el("select", {id: "speed-mode", "aria-label": "accuracy mode"});
    S.modes.forEach(function (m, i) { mode.appendChild(el("option", {value: String(i), text: m})); });
    if (S.modes.length) controls.appendChild(el("label", {}, " accuracy mode ", mode));
    s.appendChild(controls);
    var div = plotDiv(s, "speed-plot", "wide");
    var tableBox = el("div", {id: "speed-table", cls: "tablebox"});
    s.appendChild(tableBox);
    var sortCol = null, sortDir = -1;
    function accOf(ci) {
      var m = Number(mode.value || 0);
      for (var i = 0; i < S.accuracy.length; i++) if (S.accuracy[i][0] === ci && S.accuracy[i][1] === m) return S.accuracy[i];
      return null;
    }
    function rows() {
      var st = Number(setting.value || 0);
      return S.rows.filter(function (r) { return r[0] === st && shown(cfg(r[1]).method); });
    }
    function drawTable(rs) {
      var header = ["configuration", "family", "TTFT s", "TTFT ×", "decode tok/s", "speed-up", "ideal", "KV MB", "KV ×",
        "attn ×", "accuracy", "KL"];
      var body = rs.map(function (r) {
        var a = accOf(r[1]);
        return [cfg(r[1]).label, cfg(r[1]).family, num(r[2], 2), num(r[3], 2), num(r[4], 1), num(r[5], 2), num(r[6], 2),
          num(r[7], 1), num(r[8], 3), num(r[9], 2), a ? num(a[2], 2) + " [" + num(a[3], 2) + "–" + num(a[4], 2) + "]" : "—",
          a ? num(a[6], 3) : "—"];
      });
      var keys = rs.map(function (r) {
        var a = accOf(r[1]);
        return [cfg(r[1]).label, cfg(r[1]).family, r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], a ? a[2] : null, a ? a[6] : null];
      });
      var idx = body.map(function (_, i) { return i; });
      if (sortCol !== null) {
        idx.sort(function (a, b) {
          var x = keys[a][sortCol], y = keys[b][sortCol];
          if (x === y) return 0;
          if (x === null) return 1;
          if (y === null) return -1;
          return (x < y ? -1 : 1) * sortDir;
        });
      }
      var t = table(header, idx.map(function (i) { return body[i]; }));
      t.querySelectorAll("th").forEach(function (th, col) {
        th.classList.add("sortable");
        th.title = "sort";
        th.addEventListener("click", function () {
          sortDir = sortCol === col ? -sortDir : (col < 2 ? 1 : -1);
          sortCol = col;
          drawTable(rows());
        });
      });
      tableBox.textContent = "";
      tableBox.appendChild(t);
    }
    function speedOnly(rs) {  // no accuracy rows for these labels: decode speed against the KV bytes stored
      var byMethod = {}, order = [];
      rs.forEach(function (r) {
        var c = cfg(r[1]), key = c.family === "reference" ? -1 : c.method;
        if (r[4] === null || r[7] === null) return;
        if (!byMethod[key]) { byMethod[key] = []; order.push(key); }
        byMethod[key].push({x: r[7], y: r[4], text: "<b>" + esc(c.label) + "</b><br>decode " + num(r[4], 1) +
          " tok/s, speed-up " + num(r[5], 2) + "× (ideal " + num(r[6], 2) + "×)<br>TTFT " + num(r[2], 2) + " s<br>KV " +
          num(r[7], 1) + " MB"});
      });
      var traces = order.sort(function (a, b) { return a - b; }).map(function (mi) {
        var pts = byMethod[mi].sort(function (a, b) { return a.x - b.x; }), ref = mi === -1;
        return {type: "scatter", mode: ref ? "markers" : "lines+markers", name: ref ? "full cache" : D.methods[mi].name,
          meta: ref ? "ref" : mi, x: pts.map(function (p) { return p.x; }), y: pts.map(function (p) { return p.y; }),
          marker: ref ? {color: "#000", symbol: "star", size: 14} : {color: color(mi), symbol: symbol(mi), size: 8},
          line: {color: ref ? "#000" : color(mi), width: 1}, text: pts.map(function (p) { return p.text; }),
          hovertemplate: "%{text}<extra></extra>"};
      });
      return react(div, traces, {title: {text: "decode speed vs stored KV", font: {size: 13}}, height: 380,
        showlegend: traces.length <= 12, legend: {font: {size: 9}},
        xaxis: {title: {text: "stored KV (MB)"}}, yaxis: {title: {text: "decode tokens/s"}}});
    }
    function build() {
      var rs = rows();
      drawTable(rs);
      if (!S.accuracy.length) return speedOnly(rs);
      var byMethod = {}, order = [], traces = [], ideal = {x: [], y: [], text: []};
      rs.forEach(function (r) {
        var a = accOf(r[1]), c = cfg(r[1]);
        if (!a || a[2] === null || r[5] === null) return;
        var txt = "<b>" + esc(c.label) + "</b><br>decode " + num(r[4], 1) + " tok/s, speed-up " + num(r[5], 2) + "× (ideal " +
          num(r[6], 2) + "×)<br>TTFT " + num(r[2], 2) + " s (" + num(r[3], 2) + "×)<br>KV " + num(r[7], 1) + " MB<br>accuracy " +
          num(a[2], 2) + " [" + num(a[3], 2) + "–" + num(a[4], 2) + "], n = " + a[5];
        var key = c.family === "reference" ? -1 : c.method;
        if (!byMethod[key]) { byMethod[key] = []; order.push(key); }
        byMethod[key].push({x: r[5], y: a[2], lo: a[3], hi: a[4], text: txt});
        if (r[6] !== null && c.family !== "reference") { ideal.x.push(r[6]); ideal.y.push(a[2]); ideal.text.push(txt); }
      });
      order.sort(function (a, b) { return a - b; }).forEach(function (mi) {
        var pts = byMethod[mi].sort(function (a, b) { return a.x - b.x; });
        var ys = pts.map(function (p) { return p.y; });
        var ref = mi === -1;
        traces.push({type: "scatter", mode: ref ? "markers" : "lines+markers", name: ref ? "full cache" : D.methods[mi].name,
          meta: ref ? "ref" : mi, x: pts.map(function (p) { return p.x; }), y: ys,
          error_y: errorBars(ys, pts.map(function (p) { return p.lo; }), pts.map(function (p) { return p.hi; }),
            ref ? "#000" : color(mi), true),
          marker: ref ? {color: "#000", symbol: "star", size: 14} : {color: color(mi), symbol: symbol(mi), size: 8},
          line: {color: ref ? "#000" : color(mi), width: 1}, text: pts.map(function (p) { return p.text; }),
          hovertemplate: "%{text}<extra></extra>"});
      });
      if (ideal.x.length) {
        traces.push({type: "scatter", mode: "markers", name: "ideal speed-up", meta: "ref", x: ideal.x, y: ideal.y,
          text: ideal.text, hovertemplate: "ideal %{x:.2f}×<br>%{text}<extra></extra>",
          marker: {symbol: "circle-open", color: "#999", size: 8}});
      }
      return react(div, traces, {title: {text: "accuracy vs decode speed-up", font: {size: 13}}, height: 380,
        showlegend: traces.length <= 12, legend: {font: {size: 9}},
        xaxis: {title: {text: "decode speed-up against the full cache (×)"}}, yaxis: {title: {text: "accuracy"}, range: [-0.05, 1.05]}});
    }
    setting.addEventListener("change", build);
    mode.addEventListener("change", build);
    follow(div, build);
  }

  // ------------------------------------------------------------------------------------------------ paired
  function buildPaired() {
    var P = D.paired;
    if (!P || !P.entries.length) return;
    var s = section("paired", "Paired comparison",
      "Pick two configurations: on the samples both answered (same task, mode and sample; for a VLM the same " +
      "question), count the samples only one of them answered right and test them with the exact two-sided sign " +
      "test (binomial, p = 1/2). With few such samples no difference can reach significance.");
    var entries = {};
    P.entries.forEach(function (e) { entries[e[0]] = e[1]; });
    var a = el("select", {id: "pair-a", "aria-label": "first configuration"});
    var b = el("select", {id: "pair-b", "aria-label": "second configuration"});
    [a, b].forEach(function (sel) {
      var groups = {};
      P.entries.forEach(function (e) {
        var c = cfg(e[0]), g = c.kind === "vlm" ? "VLM" : "KV";
        if (!groups[g]) { groups[g] = el("optgroup", {label: g}); sel.appendChild(groups[g]); }
        groups[g].appendChild(el("option", {value: String(e[0]), text: c.label + (c.family === "reference" ? " (reference)" : "")}));
      });
    });
    var firstMethod = P.entries.filter(function (e) { return cfg(e[0]).family !== "reference"; })[0] || P.entries[0];
    a.value = String(firstMethod[0]);
    var kind = cfg(firstMethod[0]).kind;
    var ref = P.entries.filter(function (e) { return cfg(e[0]).family === "reference" && cfg(e[0]).kind === kind; })[0];
    b.value = String((ref || P.entries[Math.min(1, P.entries.length - 1)])[0]);
    var swap = el("button", {type: "button", id: "pair-swap", text: "⇄ swap"});
    swap.addEventListener("click", function () { var t = a.value; a.value = b.value; b.value = t; draw(); });
    s.appendChild(el("div", {cls: "controls"}, el("label", {}, "A ", a), " ", swap, " ", el("label", {}, "B ", b)));
    var summary = el("p", {id: "pair-summary", cls: "verdict"});
    s.appendChild(summary);
    var box = el("div", {id: "pair-table", cls: "tablebox"});
    s.appendChild(box);
    var div = plotDiv(s, "pair-plot", "wide");
    function compare(ca, cb) {
      var ea = {}, rows = [];
      (entries[ca] || []).forEach(function (g) { ea[g[0]] = g[1]; });
      (entries[cb] || []).forEach(function (g) {
        var sa = ea[g[0]];
        if (sa === undefined) return;
        var sb = g[1], n = 0, both = 0, onlyA = 0, onlyB = 0, ra = 0, rb = 0;
        for (var i = 0; i < sa.length; i++) {
          var x = sa.charAt(i), y = sb.charAt(i);
          if (x === "." || y === ".") continue;
          n++;
          if (x === "1") ra++;
          if (y === "1") rb++;
          if (x === "1" && y === "1") both++;
          else if (x === "1") onlyA++;
          else if (y === "1") onlyB++;
        }
        if (n) rows.push({group: P.groups[g[0]].name, n: n, both: both, onlyA: onlyA, onlyB: onlyB, ra: ra, rb: rb});
      });
      return rows;
    }
    function draw() {
      var ca = Number(a.value), cb = Number(b.value), rows = compare(ca, cb);
      var la = cfg(ca).label, lb = cfg(cb).label;
      var tot = rows.reduce(function (t, r) {
        return {n: t.n + r.n, both: t.both + r.both, onlyA: t.onlyA + r.onlyA, onlyB: t.onlyB + r.onlyB, ra: t.ra + r.ra, rb: t.rb + r.rb};
      }, {n: 0, both: 0, onlyA: 0, onlyB: 0, ra: 0, rb: 0});
      var p = signTest(tot.onlyA, tot.onlyB);
      summary.setAttribute("data-n", String(tot.n));
      summary.setAttribute("data-only-a", String(tot.onlyA));
      summary.setAttribute("data-only-b", String(tot.onlyB));
      summary.setAttribute("data-p", String(p));
      if (!tot.n) {
        summary.textContent = la + " and " + lb + " share no sample: nothing to compare.";
      } else {
        var better = tot.onlyA === tot.onlyB ? "neither is ahead" : (tot.onlyA > tot.onlyB ? la : lb) + " is ahead";
        summary.textContent = tot.n + " shared samples: " + la + " right on " + tot.ra + ", " + lb + " on " + tot.rb +
          "; only " + la + " right on " + tot.onlyA + ", only " + lb + " right on " + tot.onlyB + " — " + better +
          ", sign test p = " + p.toPrecision(3) + (p < 0.05 ? " (significant at 5 %)." : " (not significant at 5 %).");
      }
      var body = rows.map(function (r) {
        return [r.group, String(r.n), String(r.both), String(r.onlyA), String(r.onlyB), num(r.ra / r.n, 3), num(r.rb / r.n, 3),
          signTest(r.onlyA, r.onlyB).toPrecision(3)];
      });
      if (rows.length > 1) {
        body.push(["all", String(tot.n), String(tot.both), String(tot.onlyA), String(tot.onlyB), num(tot.ra / tot.n, 3),
          num(tot.rb / tot.n, 3), p.toPrecision(3)]);
      }
      box.textContent = "";
      box.appendChild(table(["samples", "pairs", "both right", "only A right", "only B right", "accuracy A", "accuracy B",
        "p (sign test)"], body));
      var names = rows.map(function (r) { return r.group; });
      return react(div, [
        {type: "bar", name: "only A right (" + la + ")", x: names, y: rows.map(function (r) { return r.onlyA; }), marker: {color: "#1f77b4"}},
        {type: "bar", name: "only B right (" + lb + ")", x: names, y: rows.map(function (r) { return r.onlyB; }), marker: {color: "#ff7f0e"}}
      ], {title: {text: "discordant samples per task", font: {size: 13}}, height: 340, barmode: "group",
        yaxis: {title: {text: "samples"}}, legend: {orientation: "h", y: -0.25}, margin: {l: 52, r: 12, t: 34, b: 90}});
    }
    a.addEventListener("change", draw);
    b.addEventListener("change", draw);
    pending.push(draw());
  }

  // ------------------------------------------------------------------------------------------------ VLM
  function buildVlm() {
    if (!D.vlm.length && !D.vlm_bench) return;
    var s = section("vlm", "Visual-token pruning (VLM)",
      "Accuracy per question type against the visual tokens kept (to the language model's last layer, over the " +
      "image's), one line per method with 95 % Wilson intervals; the star and the dotted line are the unpruned model. " +
      "Methods at one budget are drawn up to ±0.015 apart so their intervals stay apart. Hover or click a point to " +
      "see which patches that configuration keeps.");
    var tiles = D.vlm_tiles || {};
    D.vlm.forEach(function (g, gi) {
      s.appendChild(el("h3", {text: "Accuracy of " + g.model + " on " + g.split + " scenes"}));
      s.appendChild(el("p", {cls: "note", text: g.questions + " questions of " + g.scenes + " scenes."}));
      var wrap = el("div", {cls: "vlm-wrap"});
      s.appendChild(wrap);
      var grid = el("div", {cls: "grid cols-3"});
      wrap.appendChild(grid);
      var side = el("figure", {id: "vlm-tile-" + gi, cls: "tile"});
      var img = el("img", {alt: "kept patches", id: "vlm-tile-img-" + gi});
      var cap = el("figcaption", {text: Object.keys(tiles).length ? "Hover or click a point: the patches that " +
        "configuration keeps (darkest: removed before the language model; half-dimmed: removed inside it)." :
        "No per-configuration kept-patch images in the store (tokensieve train vlm-eval --overlays PNG --store); " +
        "a recorded kept-patch figure is in the static report below."});
      side.appendChild(img);
      side.appendChild(cap);
      wrap.appendChild(side);
      function showTile(label) {
        if (!tiles[label]) return;
        img.src = tiles[label];
        img.setAttribute("data-label", label);
        cap.textContent = label + ": the patches it keeps (darkest: removed before the language model; half-dimmed: " +
          "removed inside it; clear: kept to the last layer).";
      }
      var visual = [];
      g.points.forEach(function (p) { var m = cfg(p[0]).method; if (cfg(p[0]).family !== "reference" && visual.indexOf(m) < 0) visual.push(m); });
      visual.sort(function (x, y) { return x - y; });
      g.types.forEach(function (type, ti) {
        var div = plotDiv(grid, "vlm-" + gi + "-" + ti);
        div.setAttribute("data-type", type);
        follow(div, function () {
          var traces = [], full = null, byMethod = {};
          g.points.forEach(function (p) {
            if (p[1] !== ti) return;
            var c = cfg(p[0]);
            if (c.family === "reference") { full = p; return; }
            if (!shown(c.method) || p[6] === null) return;
            (byMethod[c.method] = byMethod[c.method] || []).push(p);
          });
          function hover(p) {
            var c = cfg(p[0]);
            return "<b>" + esc(c.label) + "</b><br>accuracy " + num(p[3] / p[2], 2) + " [" + num(p[4], 2) + "–" + num(p[5], 2) +
              "], " + p[3] + " of " + p[2] + "<br>visual kept " + pct(p[6], 1) + " · KV kept " + pct(p[7], 1);
          }
          visual.forEach(function (mi, k) {
            var pts = (byMethod[mi] || []).slice().sort(function (a, b) { return a[6] - b[6]; });
            if (!pts.length) return;
            var dodge = visual.length > 1 ? 0.015 * (2 * k / (visual.length - 1) - 1) : 0;
            var ys = pts.map(function (p) { return p[3] / p[2]; });
            traces.push({type: "scatter", mode: "lines+markers", name: D.methods[mi].name, meta: mi,
              x: pts.map(function (p) { return p[6] + dodge; }), y: ys,
              error_y: errorBars(ys, pts.map(function (p) { return p[4]; }), pts.map(function (p) { return p[5]; }), color(mi), true),
              marker: {color: color(mi), size: 7}, line: {color: color(mi), width: 1.2},
              customdata: pts.map(function (p) { return cfg(p[0]).label; }),
              text: pts.map(hover), hovertemplate: "%{text}<extra></extra>"});
          });
          var shapes = [];
          if (full) {
            var y = full[3] / full[2];
            traces.push({type: "scatter", mode: "markers", name: "full model", meta: "ref", x: [full[6] === null ? 1 : full[6]], y: [y],
              error_y: errorBars([y], [full[4]], [full[5]], "#000", true), marker: {color: "#000", symbol: "star", size: 13},
              customdata: [cfg(full[0]).label], text: [hover(full)], hovertemplate: "%{text}<extra></extra>"});
            shapes.push({type: "line", xref: "paper", x0: 0, x1: 1, y0: y, y1: y, line: {color: "#000", width: 1, dash: "dot"}});
          }
          var n = g.points.filter(function (p) { return p[1] === ti; }).reduce(function (t, p) { return t + p[2]; }, 0);
          return react(div, traces, {title: {text: type + " (" + n + " answers)", font: {size: 12}}, height: ti ? 300 : 430,
            margin: ti ? undefined : {l: 52, r: 12, t: 34, b: 150},  // room for the legend below the axis title
            shapes: shapes, showlegend: ti === 0, legend: {orientation: "h", y: -0.3, yanchor: "top", font: {size: 9}},
            xaxis: {title: {text: "visual tokens kept"}, range: [-0.02, 1.06], tickformat: ".0%"},
            yaxis: {title: {text: "accuracy"}, range: [-0.05, 1.05]}}).then(function () {
            if (!div._tileHooks) {
              div._tileHooks = true;
              var pick = function (ev) { var p = ev.points[0]; if (p && p.customdata) showTile(p.customdata); };
              div.on("plotly_hover", pick);
              div.on("plotly_click", pick);
            }
          });
        });
      });
      var firstLabel = Object.keys(tiles)[0];
      if (firstLabel) showTile(firstLabel);
    });
    if (D.vlm_bench) {
      s.appendChild(el("h3", {text: "Prefill speed (tokensieve bench --vlm)"}));
      s.appendChild(el("div", {cls: "tablebox"}, table(D.vlm_bench.header, D.vlm_bench.body, "vlm-bench")));
    }
  }

  // ------------------------------------------------------------------------------------------------ DAAM
  function buildDaam() {
    var A = D.daam;
    if (!A || !A.runs) return;
    var s = section("daam", "DAAM speech runs",
      "Training runs of the DAAM speech networks recorded in the store (tokensieve train daam --store): test F1 macro " +
      "per front block, mean ± standard deviation over seeds (each seed on hover); importance maps are the mean weight " +
      "of each mel band per class over the test split (tokensieve train daam-figures --store).");
    var tasks = [];
    A.runs.forEach(function (r) { if (tasks.indexOf(r.task) < 0) tasks.push(r.task); });
    var grid = el("div", {cls: "grid cols-2"});
    s.appendChild(grid);
    tasks.sort().forEach(function (task) {
      var div = plotDiv(grid, "daam-" + task);
      var groups = {}, names = [];
      A.runs.forEach(function (r) {
        if (r.task !== task || r.f1 === null) return;
        var name = r.network + " · " + r.front + " · " + r.epochs + " ep";
        if (!groups[name]) { groups[name] = []; names.push(name); }
        groups[name].push(r);
      });
      names.sort();
      var means = [], sds = [], texts = [];
      names.forEach(function (nm) {
        var xs = groups[nm].map(function (r) { return r.f1; });
        var m = xs.reduce(function (a, b) { return a + b; }, 0) / xs.length;
        var sd = xs.length > 1 ? Math.sqrt(xs.reduce(function (a, b) { return a + (b - m) * (b - m); }, 0) / (xs.length - 1)) : 0;
        means.push(m); sds.push(sd);
        texts.push("<b>" + esc(nm) + "</b><br>F1 " + num(m, 3) + " ± " + num(sd, 3) + "<br>" +
          groups[nm].map(function (r) { return "seed " + r.seed + ": " + num(r.f1, 3); }).join("<br>"));
      });
      pending.push(react(div, [{type: "bar", x: names, y: means, text: texts, hovertemplate: "%{text}<extra></extra>",
        textposition: "none", error_y: {type: "data", array: sds, visible: true, color: "#333"}, marker: {color: "#4c78a8"}}],
        {title: {text: "task " + task.toUpperCase() + ": test F1 macro", font: {size: 13}}, height: 340,
          yaxis: {title: {text: "test F1 macro"}, range: [0, 1]}, margin: {l: 52, r: 12, t: 34, b: 110}}));
    });
    A.maps.forEach(function (m, i) {
      var div = plotDiv(grid, "daam-map-" + i);
      pending.push(react(div, [{type: "heatmap", z: m.bands, y: m.classes, colorscale: "Viridis",
        hovertemplate: "class %{y}, mel band %{x}: weight %{z:.3f}<extra></extra>"}],
        {title: {text: "task " + String(m.task).toUpperCase() + ": mel-band importance (" + m.run + ")", font: {size: 12}},
          height: 320, xaxis: {title: {text: "mel band"}}, margin: {l: 90, r: 12, t: 34, b: 44}}));
    });
  }

  // ------------------------------------------------------------------------------------------------ start
  var pending = [];
  buildHeader();
  buildPicker();
  buildAccuracy();
  buildSpeed();
  buildPaired();
  buildVlm();
  buildDaam();
  var tables = document.getElementById("tables");
  if (tables) {
    document.getElementById("main").appendChild(tables);
    document.getElementById("nav").appendChild(el("a", {href: "#tables", text: "All tables"}));
  }
  Promise.all(pending.concat([update()])).then(function () {
    var traces = {};
    document.querySelectorAll(".plot").forEach(function (d) { traces[d.id] = d.data ? d.data.length : 0; });
    window.__report = {ready: true, renderMs: performance.now(), traces: traces, signTest: signTest};
    document.body.setAttribute("data-ready", "1");
  }, function (err) {
    window.__errors.push(String(err && err.stack || err));
    document.body.setAttribute("data-ready", "error");
  });
})();
