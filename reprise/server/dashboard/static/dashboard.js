// The dashboard: polls /v1/dashboard/state every 1.5 s and draws it (cards, SVG charts, tables).
"use strict";

(() => {
  const { api, svg, el, pct, ms, num, lineChart } = reprise;
  const POLL_MS = 1500;
  const COLORS = { used: "#d9534f", cached: "#2b8a3e", free: "#c9ced6", pinned: "#7048e8", all: "#1d2330" };
  const set = (id, text) => { document.getElementById(id).textContent = text; };

  function hue(label) {
    let h = 0;
    for (const c of label) h = (h * 31 + c.charCodeAt(0)) % 360;
    return label === "shared" ? 210 : h;
  }

  function renderCards(state) {
    const { cache, pool, ttft } = state;
    const rate = document.getElementById("hit-rate");
    rate.textContent = pct(cache.hit_rate);
    rate.dataset.value = cache.hit_rate === null ? "" : String(cache.hit_rate);
    set("hits", num(cache.hits));
    set("queries", num(cache.queries));
    set("pool-used-cached", `${num(pool.used)} / ${num(pool.cached)}`);
    set("pool-size", num(pool.num_blocks));
    set("pool-free", num(pool.free));
    set("pool-pinned", num(pool.pinned));
    set("evictions", num(pool.evictions));
    set("preemptions", num(pool.preemptions));
    set("ttft-hit", ms(ttft.hit.mean_s));
    set("ttft-miss", ms(ttft.miss.mean_s));
    set("ttft-counts", `${ttft.hit.count} hits, ${ttft.miss.count} misses`);
    set("scope", state.scope === "all" ? "all namespaces" : "your namespace: " + state.own_namespaces.join(", "));
  }

  // Stacked areas of used, cached and free blocks (they sum to the pool), and the pinned line.
  function renderPool(state) {
    const host = document.getElementById("pool-chart");
    const samples = state.history.concat([{ t: state.time, ...state.pool }]);
    lineChart(host, [{ name: "pinned", color: COLORS.pinned, points: samples.map((s) => [s.t, s.pinned]) }],
      state.pool.num_blocks, (v) => num(Math.round(v)));
    if (samples.length < 2) return;
    const total = state.pool.num_blocks || 1;
    const t0 = samples[0].t, t1 = Math.max(samples[samples.length - 1].t, t0 + 1);
    const x = (t) => 44 + 552 * (t - t0) / (t1 - t0), y = (v) => 4 + 140 * (1 - v / total);
    const layer = svg("g", {});
    host.insertBefore(layer, host.querySelector("path"));      // under the pinned line
    let below = samples.map(() => 0);
    for (const name of ["used", "cached", "free"]) {
      const above = samples.map((s, i) => below[i] + s[name]);
      const top = samples.map((s, i) => `${x(s.t).toFixed(1)},${y(above[i]).toFixed(1)}`);
      const bottom = samples.map((s, i) => `${x(s.t).toFixed(1)},${y(below[i]).toFixed(1)}`).reverse();
      svg("polygon", { points: top.concat(bottom).join(" "), fill: COLORS[name], opacity: 0.75, "data-series": name },
        layer);
      below = above;
    }
  }

  // The token-weighted hit rate between consecutive samples, and each namespace's so far.
  function renderHitRate(state) {
    const samples = state.history.concat([{ t: state.time, queries: state.cache.queries, hits: state.cache.hits,
      namespaces: Object.fromEntries(state.namespaces.map((n) => [n.label, [n.prompt_tokens, n.cached_tokens]])) }]);
    const windowed = [];
    for (let i = 1; i < samples.length; i++) {
      const queries = samples[i].queries - samples[i - 1].queries;
      if (queries > 0) windowed.push([samples[i].t, (samples[i].hits - samples[i - 1].hits) / queries]);
    }
    const series = [{ name: "all", color: COLORS.all, points: windowed }];
    for (const row of state.namespaces.slice(0, 6)) {
      const points = samples.filter((s) => s.namespaces && s.namespaces[row.label] && s.namespaces[row.label][0])
        .map((s) => [s.t, s.namespaces[row.label][1] / s.namespaces[row.label][0]]);
      series.push({ name: row.label, color: `hsl(${hue(row.label)} 60% 45%)`, points });
    }
    lineChart(document.getElementById("hit-chart"), series, 1, (v) => Math.round(100 * v) + "%");
    const legend = document.getElementById("hit-legend");
    legend.replaceChildren();
    for (const s of series) {
      const item = el("span", {}, legend);
      el("i", {}, item).style.background = s.color;
      item.append(s.name === "all" ? "all (per interval)" : s.name + " (so far)");
    }
  }

  // The icicle: one row per depth; a node's width is its share of its parent's tokens.
  function renderTree(state) {
    const { tree } = state;
    const host = document.getElementById("icicle");
    host.replaceChildren();
    const [width, rowHeight] = [900, 26];
    const labels = Object.keys(tree.namespaces).sort((a, b) => tree.namespaces[b] - tree.namespaces[a]);
    const total = labels.reduce((sum, label) => sum + tree.namespaces[label], 0);
    set("tree-summary",
      `${num(total)} tokens in ${num(tree.num_nodes)} nodes; the ${tree.prefixes.length} largest subtrees shown`);
    const children = new Map();
    for (const prefix of tree.prefixes) {
      const key = prefix.parent === null ? "ns:" + prefix.namespace : prefix.parent;
      if (!children.has(key)) children.set(key, []);
      children.get(key).push(prefix);
    }
    let depth = 0;
    const place = (key, x0, span, tokens, level) => {
      let x = x0;
      const below = (children.get(key) || []).sort((a, b) => a.start - b.start || b.subtree_tokens - a.subtree_tokens);
      for (const prefix of below) {
        const w = span * prefix.subtree_tokens / tokens;
        drawNode(host, prefix, x, level, w, rowHeight);
        depth = Math.max(depth, level);
        place(prefix.id, x, w, prefix.subtree_tokens, level + 1);
        x += w;
      }
    };
    let x = 0;
    for (const label of labels) {
      const w = width * tree.namespaces[label] / (total || 1);
      const g = svg("g", { "data-namespace": label }, host);
      svg("rect", { x, y: 0, width: Math.max(w - 1, 0.5), height: rowHeight - 2,
        fill: `hsl(${hue(label)} 30% 80%)` }, g);
      svg("text", { x: x + 4, y: 16 }, g).textContent = w > 80 ? `${label} · ${num(tree.namespaces[label])} tok` : "";
      svg("title", {}, g).textContent = `${label}: ${tree.namespaces[label]} tokens cached`;
      place("ns:" + label, x, w, tree.namespaces[label], 1);
      x += w;
    }
    host.setAttribute("viewBox", `0 0 ${width} ${(depth + 1) * rowHeight}`);
    renderPrefixTable(state, tree);
  }

  function drawNode(host, prefix, x, level, w, rowHeight) {
    const g = svg("g", { class: "prefix", "data-namespace": prefix.namespace, "data-tokens": prefix.subtree_tokens,
      "data-blocks": prefix.subtree_blocks, "data-start": prefix.start }, host);
    const pinned = prefix.pinned_for_s !== null;
    svg("rect", { x, y: level * rowHeight, width: Math.max(w - 1, 0.5), height: rowHeight - 2,
      fill: `hsl(${hue(prefix.namespace)} 55% ${Math.max(62, 84 - 4 * level)}%)`,
      stroke: pinned ? COLORS.pinned : "none", "stroke-width": pinned ? 2 : 0 }, g);
    svg("text", { x: x + 4, y: level * rowHeight + 16 }, g).textContent =
      w > 70 ? `${num(prefix.subtree_tokens)} tok` + (w > 160 && prefix.text ? " · " + prefix.text.slice(0, 30) : "")
        : "";
    svg("title", {}, g).textContent = `${prefix.namespace} [${prefix.start}, ${prefix.start + prefix.num_tokens}): `
      + `${prefix.subtree_tokens} tokens, ${prefix.subtree_blocks} blocks below` + (pinned ? ", pinned" : "")
      + (prefix.text ? "\n" + prefix.text : "");
  }

  function renderPrefixTable(state, tree) {
    const body = document.querySelector("#prefixes tbody");
    body.replaceChildren();
    const newest = Math.max(0, ...tree.prefixes.map((p) => p.last_use));
    for (const prefix of tree.prefixes.slice(0, 12)) {
      const row = el("tr", { "data-tokens": prefix.subtree_tokens }, body);
      for (const value of [prefix.namespace, `${prefix.start}–${prefix.start + prefix.num_tokens}`,
        num(prefix.subtree_tokens), num(prefix.subtree_blocks), num(prefix.num_tokens),
        newest === prefix.last_use ? "latest" : `${newest - prefix.last_use} uses ago`,
        prefix.pinned_for_s === null ? "" : Math.round(prefix.pinned_for_s) + " s"]) el("td", {}, row, value);
      el("td", { class: "text" }, row, state.log_prompts ? (prefix.text || "").slice(0, 120) : "(--log-prompts)");
    }
  }

  function renderNamespaces(state) {
    const body = document.querySelector("#namespaces tbody");
    body.replaceChildren();
    for (const row of state.namespaces) {
      const tr = el("tr", { "data-namespace": row.label }, body);
      for (const value of [row.label, num(row.prompt_tokens), num(row.cached_tokens), pct(row.hit_rate),
        num(row.tree_tokens)]) el("td", {}, tr, value);
    }
  }

  function renderRequests(state) {
    const body = document.querySelector("#requests tbody");
    body.replaceChildren();
    for (const r of state.requests.slice(0, 30)) {
      const tr = el("tr", { "data-prompt-tokens": r.prompt_tokens, "data-cached-tokens": r.cached_tokens }, body);
      for (const value of [r.seq, r.namespace, num(r.prompt_tokens), num(r.cached_tokens), num(r.completion_tokens),
        r.miss_reason || "", r.diverged_at === null ? "" : r.diverged_at, ms(r.ttft_s),
        r.tokens_per_s === null ? "–" : r.tokens_per_s.toFixed(1)]) el("td", {}, tr, value);
    }
  }

  async function poll() {
    try {
      const state = await (await api("/v1/dashboard/state")).json();
      for (const render of [renderCards, renderPool, renderHitRate, renderTree, renderNamespaces, renderRequests]) {
        render(state);
      }
      document.body.dataset.updated = String(state.time);
    } catch (error) {
      set("scope", error.message);
    }
    setTimeout(poll, POLL_MS);
  }

  poll();
})();
