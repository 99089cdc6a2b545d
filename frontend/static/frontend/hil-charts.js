// The HIL run page's charts, drawn with the vendored uPlot from the evidence embedded in the page (a finished
// run never changes): latency (p50 thin, p99 thick) and throughput against concurrency, one colour per batch
// size, the candidate in solid lines and the champion measured beside it dashed over them.
(function () {
  "use strict";

  var section = document.getElementById("hil-charts");
  var source = document.getElementById("hil-chart-data");
  if (!section || !source || !window.uPlot) return;
  var data = JSON.parse(source.textContent);
  if (!data.candidate) return;

  var COLOURS = ["#1f5fbf", "#d97706", "#137a4a", "#7c3aed", "#0e7490", "#be185d"];
  var LIMIT = "#c8322a";
  var DASH = [7, 5];

  var engines = [["candidate", data.candidate, null]];
  if (data.champion) engines.push(["champion", data.champion, DASH]);

  // The x axis: every concurrency either engine was measured at, evenly spaced (they double from one to the next).
  var seen = {};
  engines.forEach(function (e) { e[1].points.forEach(function (p) { seen[p.concurrency] = true; }); });
  var xs = Object.keys(seen).map(Number).sort(function (a, b) { return a - b; });
  var batches = {};
  data.candidate.points.forEach(function (p) { batches[p.batch_size] = true; });
  var batchList = Object.keys(batches).map(Number).sort(function (a, b) { return a - b; });

  function column(points, batch, key) {
    return xs.map(function (x) {
      for (var i = 0; i < points.length; i++) {
        var p = points[i];
        if (p.batch_size === batch && p.concurrency === x) return p[key] === null || p[key] === undefined ? null : p[key];
      }
      return null;
    });
  }

  function series(label, colour, width, dash) {
    var s = { label: label, stroke: colour, width: width, spanGaps: true, points: { show: true, size: width + 4 } };
    if (dash) s.dash = dash;
    return s;
  }

  function lines(keys) {
    var out = { series: [], columns: [] };
    batchList.forEach(function (batch, i) {
      var colour = COLOURS[i % COLOURS.length];
      engines.forEach(function (e) {
        var who = e[1].label;
        keys.forEach(function (k) {
          var name = who + " · batch " + batch + (k[1] ? " · " + k[1] : "");
          out.series.push(series(name, colour, k[2], e[2]));
          out.columns.push(column(e[1].points, batch, k[0]));
        });
      });
    });
    return out;
  }

  function flat(value) { return xs.map(function () { return value; }); }

  function fromZero(u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; }

  function draw(id, spec, yLabel) {
    var figure = section.querySelector("#" + id), el = figure.querySelector(".chart-box");
    el.textContent = "";
    var opts = {
      width: Math.max(el.clientWidth, 240), height: 260,
      scales: { x: { time: false, distr: 2 }, y: { range: fromZero } },
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      series: [{ label: "concurrency" }].concat(spec.series),
      axes: [{ label: "concurrency" }, { label: yLabel, size: 60 }],
    };
    figure.setAttribute("data-series", String(spec.series.length));
    figure.setAttribute("data-points", String(xs.length));
    return new uPlot(opts, [xs].concat(spec.columns), el);
  }

  var latency = lines([["p50_ms", "p50", 1.25], ["p99_ms", "p99", 2.5]]);
  if (data.p99_budget_ms !== null) {
    latency.series.push({ label: "p99 budget", stroke: LIMIT, width: 1.5, dash: [4, 4], points: { show: false } });
    latency.columns.push(flat(data.p99_budget_ms));
  }
  var throughput = lines([["inferences_per_s", "", 2.5]]);
  if (data.min_throughput !== null) {
    throughput.series.push({ label: "at least", stroke: LIMIT, width: 1.5, dash: [4, 4], points: { show: false } });
    throughput.columns.push(flat(data.min_throughput));
  }

  var charts = { "chart-hil-latency": draw("chart-hil-latency", latency, "ms"),
                 "chart-hil-throughput": draw("chart-hil-throughput", throughput, "inferences/s") };
  section.setAttribute("data-drawn", "true");

  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (id) {
      var el = section.querySelector("#" + id + " .chart-box");
      charts[id].setSize({ width: Math.max(el.clientWidth, 240), height: charts[id].height });
    });
  });
})();
