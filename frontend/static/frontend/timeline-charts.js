// The model timeline's swimlane chart, drawn with the vendored uPlot from the data embedded in the page: one
// lane per version (oldest at the bottom), its share of client traffic as a stepped band filling its lane from
// the bottom (a full band is 100%), a shadow as a dashed line; rollouts, approvals, promotions and rollbacks as
// labelled vertical lines.
(function () {
  "use strict";

  var section = document.getElementById("timeline-chart");
  var source = document.getElementById("timeline-chart-data");
  if (!section || !source || !window.uPlot) return;
  var data = JSON.parse(source.textContent);
  if (!data.lanes.length) return;

  var COLOURS = ["#1f5fbf", "#d97706", "#137a4a", "#7c3aed", "#0e7490", "#be185d"];
  var MARKS = {
    started: "#667085", restore: "#c8322a", promoted: "#137a4a", rolled_back: "#c8322a", approval: "#137a4a",
    rejection: "#9a5b00", break_glass: "#c8322a", awaiting_approval: "#9a5b00", paused: "#9a5b00", resumed: "#667085",
  };
  var BAND = 0.8;  // of a lane's height: the rest keeps lanes apart
  var LANE_PX = 56;

  function rgba(hex, alpha) {
    var n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + alpha + ")";
  }

  var stepped = uPlot.paths && uPlot.paths.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined;
  var series = [{ label: "time" }], columns = [data.times];
  data.lanes.forEach(function (lane, i) {
    var colour = COLOURS[i % COLOURS.length];
    var shadow = lane.roles.some(function (r) { return r === "shadow"; });
    series.push({
      label: lane.label, stroke: colour, width: 2, fill: rgba(colour, 0.25), fillTo: i, paths: stepped,
      dash: shadow && lane.roles.every(function (r) { return r === null || r === "shadow"; }) ? [5, 4] : undefined,
      points: { show: false }, spanGaps: false,
      // The legend says the share and the role, not the lane's drawing height.
      value: function (u, v, s, idx) {
        if (idx === null || idx === undefined || lane.shares[idx] === null) return "—";
        return lane.roles[idx] === "shadow" ? "shadow (0%)" : lane.shares[idx] + "% " + lane.roles[idx];
      },
    });
    // A shadow takes no client traffic: a thin line just above its lane's floor, so it still shows.
    columns.push(lane.shares.map(function (share, k) {
      if (share === null) return null;
      return i + (lane.roles[k] === "shadow" ? 0.04 : Math.max(share, 1) / 100 * BAND);
    }));
  });

  function markerHook(u) {
    var ctx = u.ctx, top = u.bbox.top, bottom = u.bbox.top + u.bbox.height;
    ctx.save();
    ctx.font = (11 * devicePixelRatio) + "px system-ui, sans-serif";
    ctx.textBaseline = "top";
    ctx.textAlign = "left";  // uPlot leaves its axes' alignment on the context
    var rowEnds = [-Infinity, -Infinity, -Infinity];  // each label row's right edge so far
    data.markers.forEach(function (m) {
      var x = Math.round(u.valToPos(m.t, "x", true)) + 0.5;  // on a pixel's centre: a crisp line
      if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
      var colour = MARKS[m.kind] || "#667085";
      ctx.strokeStyle = colour;
      ctx.fillStyle = colour;
      ctx.lineWidth = devicePixelRatio;
      ctx.setLineDash(m.kind === "started" || m.kind === "resumed" ? [3 * devicePixelRatio, 3 * devicePixelRatio] : []);
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, bottom);
      ctx.stroke();
      // A label goes in the first of three rows where it does not print over its neighbour; where none is
      // free (changes seconds apart on a long window) the line stays unlabelled: the events below name it.
      var text = m.label.length > 48 ? m.label.slice(0, 47) + "…" : m.label;
      var width = ctx.measureText(text).width;
      var left = x + 3 + width > u.bbox.left + u.bbox.width ? x - 3 - width : x + 3;
      var row = rowEnds.findIndex(function (end) { return left > end + 4 * devicePixelRatio; });
      if (row < 0) return;
      rowEnds[row] = left + width;
      var y = top + row * 13 * devicePixelRatio + 2;
      ctx.fillStyle = "rgba(255,255,255,.85)";
      ctx.fillRect(left - 1, y - 1, width + 2, 12 * devicePixelRatio);
      ctx.fillStyle = colour;
      ctx.fillText(text, left, y);
    });
    ctx.restore();
  }

  var box = section.querySelector(".chart-box");
  var lanes = data.lanes.length;
  var height = Math.max(lanes * LANE_PX, 120) + 80;
  var opts = {
    width: Math.max(box.clientWidth, 240), height: height,
    scales: { x: { time: true, range: [data.since, data.until] }, y: { range: [0, lanes + 0.45] } },
    legend: { live: true },
    cursor: { drag: { x: true, y: false } },
    series: series,
    axes: [
      {},
      {
        size: 50, label: "version",
        splits: function () { return data.lanes.map(function (l, i) { return i + BAND / 2; }); },
        values: function () { return data.lanes.map(function (l) { return l.label; }); },
        grid: { show: false },
      },
    ],
    hooks: { draw: [markerHook] },
  };
  box.textContent = "";
  var chart = new uPlot(opts, columns, box);
  section.setAttribute("data-drawn", "true");

  window.addEventListener("resize", function () {
    chart.setSize({ width: Math.max(box.clientWidth, 240), height: height });
  });
})();
