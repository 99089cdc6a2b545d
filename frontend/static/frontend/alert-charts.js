// The alert page's charts, drawn with the vendored uPlot from /alerts/<id>/series/: the version's requests
// slower than the latency objective and its error rate per SLO sampling interval, each against its budget
// (dashed red), and the drifted share of its drift checks against the share that counts as drift.
(function () {
  "use strict";

  var section = document.getElementById("alert-charts");
  if (!section || !window.uPlot) return;

  var FIGURE = "#1f5fbf", LIMIT = "#c8322a";

  function options(el, label, yLabel, points) {
    return {
      width: Math.max(el.clientWidth, 240), height: 200,
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; } } },
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      series: [
        { label: "time" },
        { label: label, stroke: FIGURE, width: 2, points: { show: points } },
        { label: "limit", stroke: LIMIT, width: 1.5, dash: [6, 5], points: { show: false } },
      ],
      axes: [{}, { label: yLabel, size: 60 }],
    };
  }

  function percent(rows, key) {
    return rows.map(function (r) { return r[key] === null ? null : r[key] * 100; });
  }

  function chart(id, rows, label, yLabel, values, limit, points) {
    var figure = section.querySelector("#" + id), el = figure.querySelector(".chart-box");
    figure.setAttribute("data-points", String(rows.length));
    if (rows.length === 0) { el.textContent = "No figures in the last hours."; return; }
    el.textContent = "";
    var times = rows.map(function (r) { return r.at; });
    var line = rows.map(function () { return limit; });
    new uPlot(options(el, label, yLabel, points), [times, values, line], el);
  }

  fetch(section.getAttribute("data-series-url"), { credentials: "same-origin", headers: { Accept: "application/json" } })
    .then(function (r) { return r.ok ? r.json() : null; })
    .then(function (data) {
      if (!data) return;
      chart("chart-slow", data.slo, data.version + " slower than " + data.latency_ms + " ms", "%",
            percent(data.slo, "slow_share"), data.slow_budget * 100, false);
      chart("chart-errors", data.slo, data.version + " errors", "%", percent(data.slo, "error_rate"),
            data.error_budget * 100, false);
      chart("chart-drift", data.drift, data.version + " drifted columns", "%", percent(data.drift, "drifted_share"),
            data.drift_share * 100, true);
      section.setAttribute("data-loaded", "true");
    });
})();
