// tenantware dashboard. Plain JS, no build step. Every string from the server is put on the
// page with textContent (never innerHTML): tenant names and cost centers are tenant-supplied.
"use strict";
(() => {
  const STORAGE_KEY = "tenantware.dashboard.key";
  const REFRESH_MS = 30000;
  const COLORS = ["#0b57d0", "#146c2e", "#b3261e", "#8a4b00", "#6d28d9", "#00677f", "#a0116b", "#444"];
  const $ = (id) => document.getElementById(id);
  const state = { view: null, live: null, tenants: null, tiers: null, migration: null, account: null, balance: null, month: null, day: null, timer: null, plots: [] };

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  const int = (n) => Number(n || 0).toLocaleString("en-US");
  const num1 = (n) => (n === null || n === undefined ? "–" : Number(n).toFixed(1));
  const secs = (s) => (s === null || s === undefined ? "–" : Number(s).toFixed(3));
  const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
  const share = (p) => Number(p).toLocaleString("en-US", { maximumFractionDigits: 2 }) + "%";
  // Nano-USD (an integer) to USD with 6 decimals, rounded half up like the ledger's reports.
  const usd = (nano) => money((BigInt(Math.round(Number(nano || 0))) + 500n) / 1000n);

  // Money: the server's exact decimals, summed as integer millionths (no float drift).
  function micros(text) {
    const [whole, frac = ""] = String(text || "0").split(".");
    const sign = whole.startsWith("-") ? -1n : 1n;
    return BigInt(whole) * 1000000n + sign * BigInt((frac + "000000").slice(0, 6));
  }
  function money(m) {
    const neg = m < 0n;
    const a = neg ? -m : m;
    const frac = (a % 1000000n).toString().padStart(6, "0");
    return (neg ? "-" : "") + int(Number(a / 1000000n)) + "." + frac;
  }

  async function api(path) {
    const key = sessionStorage.getItem(STORAGE_KEY);
    const response = await fetch(path, {
      headers: { Authorization: "Bearer " + key },
      cache: "no-store",
      credentials: "omit",
    });
    const type = response.headers.get("content-type") || "";
    const body = type.includes("json") ? await response.json() : null;
    if (!response.ok) {
      const error = new Error((body && body.error && body.error.message) || "HTTP " + response.status);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  function rangeQuery(withTenant = true) {
    const params = new URLSearchParams();
    const range = $("range").value;
    if (range === "custom") {
      if ($("since").value) params.set("since", $("since").value + "Z");
      if ($("until").value) params.set("until", $("until").value + "Z");
    } else {
      params.set("range", range);
    }
    if (withTenant && $("only").value) params.set("tenant", $("only").value);
    return params.toString();
  }

  async function load() {
    showError("");
    try {
      const view = await api("/admin/dashboard/usage?" + rangeQuery());
      state.view = view;
      if (view.scope === "operator") {
        [state.live, state.tenants, state.tiers, state.migration] = await Promise.all([
          api("/admin/dashboard/live"),
          api("/admin/tenants?limit=1000"),
          api("/admin/tiers"),
          api("/admin/dashboard/migration?" + rangeQuery(false)),
        ]);
        state.account = state.balance = state.month = state.day = null;
      } else {
        const path = "/admin/tenants/" + encodeURIComponent(view.tenant);
        state.account = await api(path);
        state.live = state.tenants = state.tiers = state.migration = null;
        // Spend against the budget counts from the start of the calendar month / day (UTC).
        const limits = state.account.effective_limits || {};
        const now = new Date();
        const month = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1)).toISOString();
        const day = now.toISOString().slice(0, 10) + "T00:00:00Z";
        [state.month, state.day, state.balance] = await Promise.all([
          limits.monthly_budget_usd ? api("/admin/dashboard/usage?since=" + month).catch(() => null) : null,
          limits.daily_budget_usd ? api("/admin/dashboard/usage?since=" + day).catch(() => null) : null,
          state.account.billing === "prepaid" ? api(path + "/balance").catch(() => null) : null,
        ]);
      }
      render();
      $("updated").textContent = "Updated " + new Date().toISOString().slice(11, 19) + " UTC";
    } catch (error) {
      if (error.status === 401) {
        signOut();
        showError("That key was not accepted. Check it and sign in again.");
      } else {
        showError("Could not load the dashboard: " + error.message);
      }
    }
  }

  // -- totals ----------------------------------------------------------------------------------

  function sum(rows, field) {
    return rows.reduce((total, row) => total + (row[field] || 0), 0);
  }

  function kpi(id, label, value) {
    const box = el("div", null, "kpi");
    box.append(el("span", label, "label"));
    const number = el("span", value, "value");
    number.id = "kpi-" + id;
    box.append(number);
    return box;
  }

  // Spend (USD, charged to the tenant) since the start of the budget's period, against it.
  function budgetKpi(id, label, usage, budget) {
    const spent = usage ? usd(sum(usage.totals, "charged_nanousd")) : "–";
    const box = kpi(id, label, spent);
    if (usage) {
      const used = Number(sum(usage.totals, "charged_nanousd")) / 1e9 / Number(budget);
      box.append(meter(used, label + " against the budget of " + budget + " USD"));
    }
    return box;
  }

  function renderKpis() {
    const view = state.view;
    const rows = view.totals;
    const requests = sum(rows, "requests");
    const errors = sum(rows, "errors");
    const spend = micros(view.charged);
    const boxes = [
      kpi("requests", "Requests", int(requests)),
      kpi("input-tokens", "Input tokens", int(sum(rows, "input_tokens"))),
      kpi("output-tokens", "Output tokens", int(sum(rows, "output_tokens"))),
      kpi("spend", "Spend (" + view.currency + ")", money(spend)),
      kpi("error-rate", "Error rate", requests ? pct(errors / requests) : "–"),
      kpi("rate-limited", "Rate-limited", int(sum(rows, "rate_limited"))),
      kpi("queue-refusals", "Queue refusals", int(sum(rows, "queue_rejections"))),
      kpi("breaker-refusals", "Breaker refusals", int(sum(rows, "breaker_rejections"))),
    ];
    if (view.scope === "tenant") {
      const row = rows[0] || {};
      const limits = (state.account && state.account.effective_limits) || {};
      if (limits.monthly_budget_usd) {
        boxes.push(kpi("budget", "Monthly budget (USD)", limits.monthly_budget_usd));
        boxes.push(budgetKpi("month-spend", "Spent this month (USD)", state.month, limits.monthly_budget_usd));
      }
      if (limits.daily_budget_usd) {
        boxes.push(kpi("daily-budget", "Daily budget (USD)", limits.daily_budget_usd));
        boxes.push(budgetKpi("day-spend", "Spent today (USD)", state.day, limits.daily_budget_usd));
      }
      const balance = state.balance;
      if (balance) {
        const box = kpi("balance", "Prepaid balance (" + balance.currency + ")", balance.balance_in_currency === null ? "never credited" : balance.balance_in_currency);
        if (balance.low) box.append(el("span", "Below the warning threshold", "low"));
        boxes.push(box);
      }
      boxes.push(
        kpi("p50", "Latency p50 (s)", secs(row.latency_p50_s)),
        kpi("p99", "Latency p99 (s)", secs(row.latency_p99_s)),
        kpi("ttft-p50", "First token p50 (s)", secs(row.ttft_p50_s)),
        kpi("ttft-p99", "First token p99 (s)", secs(row.ttft_p99_s)),
        kpi("queue-wait", "Longest queue wait (s)", secs(row.queue_wait_max_s)),
      );
    } else {
      const live = state.live;
      const open = live.circuits.filter((c) => c.state !== "closed").length;
      boxes.push(
        kpi("tenants", "Tenants with traffic", int(rows.length)),
        kpi("open-circuits", "Circuits not closed", int(open)),
        kpi("queued", "Queued now", int(sum(live.pools, "waiting"))),
      );
    }
    $("kpis").replaceChildren(...boxes);
  }

  // -- charts (uPlot) ----------------------------------------------------------------------------

  function buckets(view) {
    const first = Math.floor(view.since / view.bucket_s) * view.bucket_s;
    const xs = [];
    for (let x = first; x < view.until; x += view.bucket_s) xs.push(x);
    return xs;
  }

  function seriesBy(view, pick, merge) {
    // One value per bucket, merged over tenants (sum) or per tenant.
    const xs = buckets(view);
    const index = new Map(xs.map((x, i) => [x, i]));
    const values = xs.map(() => null);
    for (const row of view.series) {
      const i = index.get(Math.floor(Date.parse(row.period) / 1000));
      if (i === undefined) continue;
      const value = pick(row);
      if (value === null || value === undefined) continue;
      values[i] = values[i] === null ? value : merge(values[i], value);
    }
    return values;
  }
  const add = (a, b) => a + b;
  const zeros = (values) => values.map((v) => (v === null ? 0 : v));

  function plot(containerId, summary, series, data) {
    const container = $(containerId);
    const points = data.slice(1).reduce((n, ys) => n + ys.filter((y) => y !== null && y !== 0).length, 0);
    container.dataset.points = String(points);
    container.setAttribute("aria-description", summary);
    if (typeof uPlot === "undefined") {
      container.replaceChildren(el("p", "Charts could not be loaded.", "empty"));
      return;
    }
    // Percentiles have gaps (periods without traffic): always mark the points themselves.
    for (const s of series) if (s.spanGaps) s.points = { show: true, size: 6 };
    const options = {
      width: Math.max(260, container.clientWidth),
      height: 220,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
      scales: { x: { time: true } },
      series: [{}, ...series],
      axes: [{}, { scale: series[0].scale }, ...(series.some((s) => s.scale === "right") ? [{ scale: "right", side: 1, grid: { show: false } }] : [])],
      legend: { live: false },
    };
    container.replaceChildren();
    state.plots.push([container, new uPlot(options, data, container)]);
  }

  function renderCharts() {
    for (const [, chart] of state.plots) chart.destroy();
    state.plots = [];
    const view = state.view;
    const xs = buckets(view);
    const spend = zeros(seriesBy(view, (r) => Number(r.charged), add));
    const requests = zeros(seriesBy(view, (r) => r.requests, add));
    plot(
      "chart-spend",
      "Spend " + view.currency + " and requests per " + view.period,
      [
        { label: "Spend (" + view.currency + ")", stroke: COLORS[0], width: 2, scale: "left" },
        { label: "Requests", stroke: COLORS[1], width: 2, scale: "right" },
      ],
      [xs, spend, requests],
    );
    let latency;
    let data;
    if (view.scope === "tenant") {
      latency = [
        { label: "p50", stroke: COLORS[1], width: 2, scale: "left", spanGaps: true },
        { label: "p99", stroke: COLORS[2], width: 2, scale: "left", spanGaps: true },
        { label: "First token p99", stroke: COLORS[4], width: 2, scale: "left", spanGaps: true, dash: [6, 4] },
      ];
      data = [
        xs,
        seriesBy(view, (r) => r.latency_p50_s, Math.max),
        seriesBy(view, (r) => r.latency_p99_s, Math.max),
        seriesBy(view, (r) => r.ttft_p99_s, Math.max),
      ];
    } else {
      // p99 per tenant (percentiles do not add up across tenants), the busiest first.
      const names = tenantNames();
      const busiest = [...view.totals].sort((a, b) => b.requests - a.requests).slice(0, COLORS.length);
      latency = busiest.map((t, i) => ({
        label: "p99 " + (names.get(t.tenant) || t.tenant),
        stroke: COLORS[i],
        width: 2,
        scale: "left",
        spanGaps: true,
      }));
      data = [xs, ...busiest.map((t) => seriesBy({ ...view, series: view.series.filter((r) => r.tenant === t.tenant) }, (r) => r.latency_p99_s, Math.max))];
      if (!latency.length) {
        latency = [{ label: "p99", stroke: COLORS[2], scale: "left" }];
        data = [xs, xs.map(() => null)];
      }
    }
    $("latency-title").textContent =
      view.scope === "tenant"
        ? "Latency p50 / p99 and time to first token (seconds)"
        : "Latency p99 per tenant, busiest tenants (seconds)";
    plot("chart-latency", "Latency percentiles per " + view.period, latency, data);
    plot(
      "chart-refusals",
      "Errors and refusals per " + view.period,
      [
        { label: "Errors", stroke: COLORS[2], width: 2, scale: "left" },
        { label: "Rate-limited", stroke: COLORS[3], width: 2, scale: "left" },
        { label: "Queue refusals", stroke: COLORS[4], width: 2, scale: "left" },
        { label: "Breaker refusals", stroke: COLORS[5], width: 2, scale: "left" },
      ],
      [
        xs,
        zeros(seriesBy(view, (r) => r.errors, add)),
        zeros(seriesBy(view, (r) => r.rate_limited, add)),
        zeros(seriesBy(view, (r) => r.queue_rejections, add)),
        zeros(seriesBy(view, (r) => r.breaker_rejections, add)),
      ],
    );
  }

  // -- tables ----------------------------------------------------------------------------------

  function table(id, headers, rows, empty = "Nothing in this range.") {
    const node = $(id);
    const head = el("thead");
    const tr = el("tr");
    for (const [label, numeric] of headers) {
      const th = el("th", label, numeric ? "num" : "");
      th.scope = "col";
      tr.append(th);
    }
    head.append(tr);
    const body = el("tbody");
    for (const cells of rows) {
      const row = el("tr");
      cells.forEach((cell, i) => {
        const td = el("td", null, headers[i][1] ? "num" : headers[i][2] || "");
        if (cell instanceof Node) td.append(cell);
        else td.textContent = cell === null || cell === undefined ? "–" : String(cell);
        row.append(td);
      });
      body.append(row);
    }
    if (!rows.length) {
      const row = el("tr");
      const td = el("td", empty);
      td.colSpan = headers.length;
      row.append(td);
      body.append(row);
    }
    node.replaceChildren(head, body);
  }

  function meter(value, label) {
    const wrap = el("span");
    const m = el("meter");
    m.min = 0;
    m.max = 1;
    m.value = Math.max(0, Math.min(1, value));
    m.setAttribute("aria-label", label);
    wrap.append(m, el("span", " " + pct(value)));
    return wrap;
  }

  function tenantNames() {
    const names = new Map();
    for (const t of (state.tenants && state.tenants.data) || []) names.set(t.id, t.name || t.id);
    return names;
  }

  function renderOutcomes() {
    const rows = state.view.totals;
    const requests = sum(rows, "requests");
    const failed = sum(rows, "errors");
    const limited = sum(rows, "rate_limited");
    const queued = sum(rows, "queue_rejections");
    const broken = sum(rows, "breaker_rejections");
    const outcomes = [
      ["Answered, cancelled or refused as invalid", requests - failed - limited - queued - broken],
      ["Failed (upstream error or timeout, gateway error)", failed],
      ["Refused: rate limit or budget", limited],
      ["Refused: admission queue full or wait too long", queued],
      ["Refused: circuit open", broken],
    ];
    table(
      "outcomes-table",
      [["Outcome", false, "name"], ["Requests", true], ["Rate", true]],
      requests ? outcomes.map(([label, n]) => [label, int(n), pct(n / requests)]) : [],
    );
  }

  function renderGroups() {
    const view = state.view;
    const operator = view.scope === "operator";
    const names = tenantNames();
    for (const [id, rows, label] of [
      ["models-table", view.by_model, "Model"],
      ["centers-table", view.by_cost_center, "Cost center"],
    ]) {
      const total = rows.reduce((n, r) => n + r.requests, 0) || 1;
      const headers = [[label, false, "name"]];
      if (operator) headers.push(["Tenant", false, "name"]);
      headers.push(["Requests", true], ["Share", false], ["Tokens", true], ["Spend", true], ["p50 s", true], ["p99 s", true], ["Errors", true]);
      table(
        id,
        headers,
        rows.map((r) => [
          r.group || "(none)",
          ...(operator ? [names.get(r.tenant) || r.tenant] : []),
          int(r.requests),
          meter(r.requests / total, "Share of requests"),
          int(r.input_tokens + r.output_tokens),
          r.charged,
          secs(r.latency_p50_s),
          secs(r.latency_p99_s),
          int(r.errors),
        ]),
      );
    }
  }

  function renderOperator() {
    const view = state.view;
    const live = state.live;
    const listed = (state.tenants && state.tenants.data) || [];
    const byId = new Map(listed.map((t) => [t.id, t]));
    const tierWeight = new Map(((state.tiers && state.tiers.data) || []).map((t) => [t.id, t.weight]));
    // A tenant's own weight, else its tier's (what the fair-share scheduler uses).
    const weightOf = (id) => {
      const t = byId.get(id) || {};
      return t.weight || tierWeight.get(t.tier) || 1;
    };
    const tokens = view.totals.reduce((n, r) => n + r.input_tokens + r.output_tokens, 0) || 1;
    const weights = view.totals.reduce((n, r) => n + weightOf(r.tenant), 0) || 1;
    // Every tenant, those without traffic in the range too (they compete for nothing, so
    // they have no share by weight).
    const active = new Set(view.totals.map((r) => r.tenant));
    const idle = listed.filter((t) => !active.has(t.id) && (!view.tenant || t.id === view.tenant));
    table(
      "tenants-table",
      [["Tenant", false, "name"], ["Id", false, "name"], ["Requests", true], ["Spend", true], ["Share of tokens", false], ["Share by weight", false], ["p99 s", true], ["Error rate", true], ["Refusals", true]],
      [
        ...view.totals.map((r) => {
          const t = byId.get(r.tenant) || {};
          return [
            t.name || r.tenant,
            r.tenant,
            int(r.requests),
            r.charged,
            meter((r.input_tokens + r.output_tokens) / tokens, "Share of tokens"),
            meter(weightOf(r.tenant) / weights, "Share by weight"),
            secs(r.latency_p99_s),
            pct(r.error_rate),
            int(r.rate_limited + r.queue_rejections + r.breaker_rejections),
          ];
        }),
        ...idle.map((t) => [t.name || t.id, t.id, "0", money(0n), meter(0, "Share of tokens"), "–", "–", "–", "0"]),
      ],
    );
    table(
      "circuits-table",
      [["Upstream", false], ["Model", false], ["Circuit", false], ["Cool-down s", true], ["In flight", true]],
      live.circuits.map((c) => [c.upstream, c.model, el("span", c.state.replace("_", "-"), "state-" + c.state), c.wait_s.toFixed(1), int(c.inflight)]),
      live.breaker_enabled ? "No upstream deployment." : "Circuit breaking is off.",
    );
    table(
      "pools-table",
      [["Pool", false], ["Seats", true], ["In use", true], ["Queued", true]],
      live.pools.map((p) => [p.pool === "*" ? "all upstreams" : p.pool, int(p.seats), int(p.in_use), int(p.waiting)]),
      live.admission_enabled ? "No admission pool." : "Admission control is off.",
    );
    const health = [
      ["Store", live.store.kind + (live.store.up ? " — up" : " — DOWN")],
      ["Ledger", live.ledger ? live.ledger.ledger + (live.ledger.stuck ? " — STUCK" : " — writing") + ", " + int(live.ledger.pending) + " pending" : "metering off"],
      ["Registry", live.registry.status + (live.registry.shared ? " (shared)" : "") + ", version " + live.registry.version],
    ];
    $("health").replaceChildren(...health.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  }

  // -- migration trials (shadow / canary) ------------------------------------------------------

  const STATES = { active: "active", rolled_back: "rolled back", off: "off (shares 0)", removed: "no longer in the rules" };

  function trialName(t) {
    return t.rule + ": " + t.upstream + " / " + t.candidate_model + (t.model && t.model !== t.candidate_model ? " (for " + t.model + ")" : "");
  }

  function trialTable(t) {
    const f = t.figures;
    const node = el("table", null, "trial");
    const caption = el("caption");
    caption.append(el("span", trialName(t)), el("span", " — "), el("span", STATES[t.state] || t.state, "state-" + t.state));
    caption.append(el("span", " — canary " + share(t.canary_percent) + ", shadow " + share(t.shadow_percent)));
    node.append(caption);
    const head = el("thead");
    const tr = el("tr");
    for (const [label, cls] of [["Figure", ""], ["Primary" + (t.primary ? " (" + t.primary + ")" : ""), "num"], ["Candidate", "num"]]) {
      const th = el("th", label, cls);
      th.scope = "col";
      tr.append(th);
    }
    head.append(tr);
    const body = el("tbody");
    const shadowing = t.shadow_percent > 0 || f.shadow_requests > 0 || f.shadow_dropped > 0;
    const canarying = t.canary_percent > 0 || f.canary_requests > 0;
    const shadowRows = [
      ["Shadowed requests", int(f.shadow_requests), int(f.shadow_requests)],
      ["Shadow copies dropped", null, int(f.shadow_dropped)],
      ["Error rate (shadowed)", pct(f.primary_error_rate), pct(f.shadow_error_rate)],
      ["Latency p50 (s)", secs(f.primary_latency_p50_s), secs(f.shadow_latency_p50_s)],
      ["Latency p99 (s)", secs(f.primary_latency_p99_s), secs(f.shadow_latency_p99_s)],
      ["First token p50 (s)", secs(f.primary_ttft_p50_s), secs(f.shadow_ttft_p50_s)],
      ["First token p99 (s)", secs(f.primary_ttft_p99_s), secs(f.shadow_ttft_p99_s)],
      ["Tokens per request", num1(f.primary_tokens_per_request), num1(f.shadow_tokens_per_request)],
      ["Cost (USD)", usd(f.primary_cost_nanousd), usd(f.shadow_cost_nanousd)],
      ["Exact same text", null, pct(f.exact_match_rate)],
      ["Word similarity (mean)", null, f.similarity_mean === null ? "–" : f.similarity_mean.toFixed(3)],
      ["Same tools called", null, pct(f.same_tools_rate)],
    ];
    const canaryRows = [
      ["Canary requests", null, int(f.canary_requests)],
      ["Canary error rate", null, pct(f.canary_error_rate)],
      ["Canary latency p50 (s)", null, secs(f.canary_latency_p50_s)],
      ["Canary latency p99 (s)", null, secs(f.canary_latency_p99_s)],
    ];
    // A trial shows the figures of what it does (both while it does neither).
    const rows = [
      ...(shadowing || !canarying ? shadowRows : shadowRows.slice(0, 1)),
      ...(canarying || !shadowing ? canaryRows : canaryRows.slice(0, 1)),
    ];
    for (const [label, primary, candidate] of rows) {
      const row = el("tr");
      const th = el("th", label);
      th.scope = "row";
      row.append(th, el("td", primary === null ? "" : primary, "num"), el("td", candidate, "num"));
      body.append(row);
    }
    node.append(head, body);
    const wrap = el("div", null, "scroll");
    wrap.append(node);
    return wrap;
  }

  function renderMigration() {
    const m = state.migration;
    const trials = (m && m.trials) || [];
    $("migration-note").textContent = !m
      ? "Not available."
      : !trials.length
        ? "No migration rules in force."
        : m.scope === "shared"
          ? "What every gateway process compared in the range (every tenant, the shared report in whole hours); the chart shows process " + m.process + "."
          : "What gateway process " + m.process + " compared in the range (every tenant)" +
          (m.oldest_kept && m.oldest_kept > m.since ? ", from " + new Date(m.oldest_kept * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC on (its oldest kept)" : "") + ".";
    $("trials").replaceChildren(...trials.map(trialTable));
    const busy = trials
      .filter((t) => t.figures.shadow_requests + t.figures.canary_requests > 0)
      .sort((a, b) => b.figures.shadow_requests + b.figures.canary_requests - (a.figures.shadow_requests + a.figures.canary_requests))
      .slice(0, COLORS.length / 2);
    $("trials-chart").hidden = !busy.length;
    if (!busy.length) return;
    const xs = buckets(m);
    const series = [];
    const data = [xs];
    busy.forEach((t, i) => {
      const own = { ...m, series: m.series.filter((p) => p.trial === t.trial) };
      series.push(
        { label: "p99 " + t.upstream + "/" + t.candidate_model, stroke: COLORS[i], width: 2, scale: "left", spanGaps: true },
        { label: "p99 primary of " + t.rule, stroke: COLORS[i], width: 2, scale: "left", spanGaps: true, dash: [6, 4] },
      );
      data.push(seriesBy(own, (p) => p.latency_p99_s, Math.max), seriesBy(own, (p) => p.primary_latency_p99_s, Math.max));
    });
    plot("chart-trials", "p99 latency of each candidate against its primary per " + m.period, series, data);
  }

  function renderTenant() {
    const account = state.account;
    const info = [
      ["Tenant", account.name || account.id],
      ["Id", account.id],
      ["Tier", account.tier],
      ["Cost center", account.cost_center || "–"],
    ];
    $("account").replaceChildren(...info.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
    table(
      "keys-table",
      [["Key id", false, "name"], ["Prefix", false], ["State", false], ["Expires (UTC)", false]],
      account.keys.map((k) => [k.id, k.prefix + "…", k.revoked ? "revoked" : "active", k.expires_at ? new Date(k.expires_at * 1000).toISOString().slice(0, 16).replace("T", " ") : "never"]),
    );
    const limits = Object.entries(account.effective_limits).filter(([, v]) => v !== null);
    table("limits-table", [["Limit", false], ["Value", true]], limits.map(([k, v]) => [k.replaceAll("_", " "), v]));
  }

  function renderTenantFilter() {
    // Operators may look at one tenant; the choice survives a refresh of the list.
    const select = $("only");
    const chosen = select.value;
    const options = [el("option", "All tenants")];
    options[0].value = "";
    for (const t of (state.tenants && state.tenants.data) || []) {
      const option = el("option", (t.name || t.id) + " (" + t.id + ")");
      option.value = t.id;
      options.push(option);
    }
    select.replaceChildren(...options);
    select.value = chosen;
  }

  function render() {
    const view = state.view;
    const operator = view.scope === "operator";
    $("tenant-filter").hidden = !operator;
    if (operator) renderTenantFilter();
    $("who").textContent = operator
      ? "Operator view: every tenant"
      : "Tenant view: " + ((state.account && state.account.name) || view.tenant);
    $("operator").hidden = !operator;
    $("tenant").hidden = operator;
    renderKpis();
    renderCharts();
    renderOutcomes();
    renderGroups();
    if (operator) {
      renderOperator();
      renderMigration();
    }
    else renderTenant();
  }

  // -- CSV of what is shown ------------------------------------------------------------------------

  function csvCell(value) {
    let text = value === null || value === undefined ? "" : String(value);
    if (/^[=+\-@\t\r]/.test(text)) text = "'" + text; // no formulas when opened in a spreadsheet
    return /[",\n\r]/.test(text) ? '"' + text.replaceAll('"', '""') + '"' : text;
  }

  function saveCsv(name, lines) {
    const blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }

  function rowsCsv(name, fields, rows) {
    const lines = [fields.map(csvCell).join(",")];
    for (const row of rows) lines.push(fields.map((f) => row[f]).map(csvCell).join(","));
    saveCsv("tenantware-" + name + "-" + new Date().toISOString().slice(0, 19).replaceAll(":", "") + "Z.csv", lines);
  }

  function downloadTrials() {
    const m = state.migration;
    if (!m) return;
    const own = ["trial", "rule", "model", "primary", "upstream", "candidate_model", "canary_percent", "shadow_percent", "state"];
    const figures = m.trials.length ? Object.keys(m.trials[0].figures).filter((f) => f !== "rule" && f !== "trial" && f !== "rolled_back") : [];
    rowsCsv("migration", [...own, ...figures], m.trials.map((t) => ({ ...t.figures, ...t, figures: undefined })));
  }

  function downloadCsv() {
    const view = state.view;
    if (!view) return;
    const fields = ["tenant", "period", "group", "requests", "errors", "input_tokens", "output_tokens", "cached_tokens", "charged", "currency", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "rate_limited", "queue_rejections", "breaker_rejections", "queue_wait_max_s"];
    const lines = [["section", ...fields].join(",")];
    for (const [section, rows] of [["total", view.totals], ["series", view.series], ["model", view.by_model], ["cost_center", view.by_cost_center]]) {
      for (const row of rows) lines.push([section, ...fields.map((f) => row[f])].map(csvCell).join(","));
    }
    saveCsv("tenantware-usage-" + new Date(view.since * 1000).toISOString().slice(0, 10) + ".csv", lines);
  }

  // -- session -----------------------------------------------------------------------------------

  function signIn(key) {
    sessionStorage.setItem(STORAGE_KEY, key);
    $("login").hidden = true;
    $("board").hidden = false;
    $("logout").hidden = false;
    load();
  }

  function signOut() {
    sessionStorage.removeItem(STORAGE_KEY);
    clearInterval(state.timer);
    state.timer = null;
    $("auto").checked = false;
    $("board").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("who").textContent = "";
    $("only").value = "";
    $("key").value = "";
    $("key").focus();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key").value.trim();
      $("key").value = "";
      if (key) signIn(key);
    });
    $("logout").addEventListener("click", signOut);
    $("controls").addEventListener("submit", (event) => {
      event.preventDefault();
      load();
    });
    $("only").addEventListener("change", load);
    $("range").addEventListener("change", () => {
      $("custom").hidden = $("range").value !== "custom";
      if ($("range").value !== "custom") load();
    });
    $("auto").addEventListener("change", () => {
      clearInterval(state.timer);
      state.timer = $("auto").checked ? setInterval(load, REFRESH_MS) : null;
    });
    $("csv").addEventListener("click", downloadCsv);
    $("trials-csv").addEventListener("click", downloadTrials);
    $("circuits-csv").addEventListener("click", () => state.live && rowsCsv("upstreams", ["key", "upstream", "model", "state", "wait_s", "inflight"], state.live.circuits));
    $("pools-csv").addEventListener("click", () => state.live && rowsCsv("queues", ["pool", "seats", "in_use", "waiting"], state.live.pools));
    let resizing = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => {
        for (const [container, chart] of state.plots) chart.setSize({ width: Math.max(260, container.clientWidth), height: 220 });
      }, 150);
    });
    const key = sessionStorage.getItem(STORAGE_KEY);
    if (key) signIn(key);
  });
})();
