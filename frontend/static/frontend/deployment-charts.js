// The deployment page's charts, drawn with the vendored uPlot from /deployments/<id>/points/.
// They follow new analysis windows every few seconds while the rollout is active, then stop.
(function () {
  "use strict";

  var section = document.getElementById("deployment-charts");
  if (!section || !window.uPlot) return;

  var STABLE = "#1f5fbf", CANARY = "#d97706", LIMIT = "#c8322a";
  var charts = {};

  function box(id) { return section.querySelector("#" + id + " .chart-box"); }

  function line(label, color, extra) {
    var series = { label: label, stroke: color, width: 2, points: { show: false } };
    for (var key in extra || {}) series[key] = extra[key];
    return series;
  }

  function limitLine(label) {
    return line(label, LIMIT, { width: 1.5, dash: [6, 5] });
  }

  // Figures start at zero so a small wobble does not look like a cliff; traffic is always 0..100%.
  function fromZero(u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; }

  function options(el, height, series, yLabel, yRange) {
    return {
      width: Math.max(el.clientWidth, 240), height: height,
      scales: { x: { time: true }, y: { range: yRange || fromZero } },
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      series: [{ label: "time" }].concat(series),
      axes: [{}, { label: yLabel, size: 60 }],
    };
  }

  function column(points, key, scale) {
    return points.map(function (p) {
      var v = p[key];
      return v === null || v === undefined ? null : v * (scale || 1);
    });
  }

  // One chart per figure: its series (label, colour) and how each is read from the points.
  function specs(data) {
    var n = data.points.length, hasStable = data.stable !== null;
    var fill = function (v) { var a = []; for (var i = 0; i < n; i++) a.push(v); return a; };
    var stepped = uPlot.paths && uPlot.paths.stepped ? { paths: uPlot.paths.stepped({ align: 1 }) } : {};
    var latency = [], errors = [];
    var latencySeries = [], errorSeries = [];
    if (hasStable) {
      latencySeries.push(line("stable " + data.stable, STABLE));
      latency.push(column(data.points, "stable_p99_ms"));
      errorSeries.push(line("stable " + data.stable, STABLE));
      errors.push(column(data.points, "stable_error_rate", 100));
    }
    latencySeries.push(line("canary " + data.canary, CANARY), limitLine("limit"));
    latency.push(column(data.points, "canary_p99_ms"), fill(data.max_p99_ms));
    errorSeries.push(line("canary " + data.canary, CANARY), limitLine("limit"));
    errors.push(column(data.points, "canary_error_rate", 100), fill(data.max_error_rate * 100));
    return {
      "chart-latency": { height: 240, label: "ms", series: latencySeries, columns: latency },
      "chart-errors": { height: 240, label: "%", series: errorSeries, columns: errors },
      "chart-weight": {
        height: 160, label: "%", range: [0, 100], series: [line("canary " + data.canary, CANARY, Object.assign({ fill: "rgba(217, 119, 6, .15)" }, stepped))],
        columns: [column(data.points, "weight")],
      },
    };
  }

  function draw(data) {
    var empty = data.points.length === 0;
    section.querySelector(".charts-empty").hidden = !empty;
    section.querySelector(".charts").hidden = empty;
    section.setAttribute("data-points", String(data.points.length));
    if (empty) return;
    var times = data.points.map(function (p) { return p.at; });
    var all = specs(data);
    Object.keys(all).forEach(function (id) {
      var spec = all[id], el = box(id), values = [times].concat(spec.columns);
      if (charts[id]) {
        charts[id].setData(values);
      } else {
        el.textContent = "";
        charts[id] = new uPlot(options(el, spec.height, spec.series, spec.label, spec.range), values, el);
      }
    });
  }

  function refresh() {
    fetch(section.getAttribute("data-points-url"), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) return;
        draw(data);
        section.setAttribute("data-live", data.active ? "true" : "false");
        if (data.active) setTimeout(refresh, data.poll_seconds * 1000);
      })
      .catch(function () { setTimeout(refresh, 5000); });  // a network hiccup: try again a little later
  }

  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (id) {
      charts[id].setSize({ width: Math.max(box(id).clientWidth, 240), height: charts[id].height });
    });
  });

  refresh();
})();
