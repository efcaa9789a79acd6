// Shared by the dashboard and the chat page: calls to the API (with the key a user typed, when the
// server has keys), SVG drawing and number formatting. No libraries.
"use strict";

const reprise = (() => {
  const KEY = "reprise.api_key";

  function headers() {
    const key = sessionStorage.getItem(KEY);
    const result = { "Content-Type": "application/json" };
    if (key) result.Authorization = "Bearer " + key;
    return result;
  }

  // The key form shows itself after a 401; submitting it keeps the key for this tab only.
  function askForKey() {
    const form = document.getElementById("key-form");
    if (!form || form.classList.contains("shown")) return;
    form.classList.add("shown");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY, form.elements.key.value.trim());
      form.classList.remove("shown");
    });
  }

  async function api(path, options = {}) {
    const response = await fetch(path, { ...options, headers: headers() });
    if (response.status === 401) askForKey();
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).error.message; } catch (ignored) { /* not JSON */ }
      throw new Error(response.status + ": " + message);
    }
    return response;
  }

  const NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, parent) {
    const node = document.createElementNS(NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (parent) parent.appendChild(node);
    return node;
  }

  function el(tag, attrs, parent, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (text !== undefined && text !== null) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  const pct = (ratio) => ratio === null || ratio === undefined ? "–" : (100 * ratio).toFixed(2) + "%";
  const ms = (seconds) => seconds === null || seconds === undefined ? "–"
    : seconds >= 1 ? seconds.toFixed(2) + " s" : (1000 * seconds).toFixed(1) + " ms";
  const num = (value) => value === null || value === undefined ? "–" : Number(value).toLocaleString("en-US");

  // A line chart over time in `host` (an <svg> with a viewBox of width x height).
  // series: [{name, cls, color, points: [[t, y], ...]}]; yMax: the top of the axis.
  function lineChart(host, series, yMax, formatY) {
    host.replaceChildren();
    const [width, height, left, bottom] = [600, 160, 44, 16];
    host.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const times = series.flatMap((s) => s.points.map((p) => p[0]));
    if (!times.length) return;
    const t0 = Math.min(...times), t1 = Math.max(...times, t0 + 1);
    const x = (t) => left + (width - left - 4) * (t - t0) / (t1 - t0);
    const y = (v) => 4 + (height - bottom - 4) * (1 - v / (yMax || 1));
    for (const fraction of [0, 0.5, 1]) {
      svg("line", { x1: left, x2: width, y1: y(fraction * yMax), y2: y(fraction * yMax), class: "axis" }, host);
      svg("text", { x: 2, y: y(fraction * yMax) + 3 }, host).textContent = formatY(fraction * yMax);
    }
    svg("text", { x: left, y: height - 2 }, host).textContent = `${Math.round(t1 - t0)} s`;
    for (const s of series) {
      if (!s.points.length) continue;
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
      svg("path", { d, fill: "none", stroke: s.color, "stroke-width": 2, "data-series": s.name }, host);
    }
  }

  return { api, svg, el, pct, ms, num, lineChart };
})();
