// memwarden dashboard: plain JavaScript, no dependencies, served from the binary.
//
// Every figure comes from this daemon's REST API (docs/API.md). Status, pools and allocations
// are polled every FAST_MS; models, recommendations, pressure thresholds and health every
// SLOW_MS; pressure changes arrive live on /api/memory/events, read with fetch() streaming
// (an EventSource cannot send the Authorization header). With `auth_token` configured, the
// first call answering 401 asks for the token once; it is kept in sessionStorage and sent as
// `Authorization: Bearer` on every call, never in a URL.
'use strict';

const TOKEN_KEY = 'memwarden.token';
const FAST_MS = 1500;
const SLOW_MS = 5000;
const WINDOW_MS = 10 * 60 * 1000; // the pressure timeline's longest span
const MIN_SPAN_MS = 2 * 60 * 1000; // and its shortest, while the page is young
const SVG_NS = 'http://www.w3.org/2000/svg'; // a namespace name, never fetched
const LEVELS = ['low', 'moderate', 'high', 'critical'];
const MAX_EVENTS = 200;
const MAX_ALLOCATION_ROWS = 200;
const CONFIRM_MS = 4000;

const state = {
  status: null, // GET /api/memory/status
  models: null, // GET /api/memory/models
  modelsError: null,
  pools: null, // GET /api/memory/pools
  pressure: new Map(), // deviceId -> its entry of GET /api/memory/pressure
  samples: new Map(), // deviceId -> [{t, u}]: utilization % (server clock, ms)
  markers: new Map(), // deviceId -> [{t, u, level, from}]: level changes
  seenEvents: new Set(),
  skew: 0, // server clock minus this browser's clock, ms
  cards: new Map(), // deviceId -> the card's elements
  signatures: new Map(), // section -> what it was last drawn from
  confirming: new Map(), // action key -> when its confirmation window ends
};

// ---------------------------------------------------------------- small helpers

const $ = (selector) => document.querySelector(selector);

/** An element: h('td', {class: 'num', dataset: {bytes: 5}}, 'text', child…). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key === 'onclick') el.addEventListener('click', value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === 'dataset') Object.assign(el.dataset, value);
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

/** Bytes as memwarden's CLI prints them (binary units). */
function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined || Number.isNaN(bytes)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let value = Math.abs(bytes);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const sign = bytes < 0 ? '−' : '';
  if (unit === 0) return `${sign}${value} B`;
  const digits = value >= 100 ? 0 : value >= 10 ? 1 : 2;
  return `${sign}${value.toFixed(digits)} ${units[unit]}`;
}

const fmtPct = (ratio) => `${(ratio * 100).toFixed(1)} %`;

function fmtClock(ms) {
  return new Date(ms - state.skew).toLocaleTimeString([], { hour12: false });
}

function fmtAgo(iso) {
  if (!iso) return '–';
  const s = Math.max(0, (serverNow() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}

function fmtDuration(seconds) {
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
  return `${Math.floor(seconds / 86400)} d ${Math.floor((seconds % 86400) / 3600)} h`;
}

const serverNow = () => Date.now() + state.skew;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const shortId = (id) => (id && id.length > 12 ? id.slice(0, 8) : id);
const path = (...parts) => parts.map(encodeURIComponent).join('/');

/** Runs `draw` only when `key`'s input differs from the last time (keeps buttons stable). */
function changed(key, input) {
  const signature = JSON.stringify(input);
  if (state.signatures.get(key) === signature) return false;
  state.signatures.set(key, signature);
  return true;
}

function toast(message, isError) {
  const el = h('div', { class: isError ? 'toast error' : 'toast', role: 'status' }, message);
  $('#toasts').append(el);
  setTimeout(() => el.remove(), isError ? 10000 : 6000);
}

function setPill(id, pillState, text) {
  const el = $(id);
  el.dataset.state = pillState;
  el.textContent = text;
}

// ---------------------------------------------------------------- the API, with the token

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let tokenPrompt = null; // one prompt, shared by every call that met a 401 meanwhile

const storedToken = () => sessionStorage.getItem(TOKEN_KEY);

/** fetch() with the bearer token; a 401 asks for the token (once) and retries. */
async function apiFetch(url, init) {
  for (;;) {
    const headers = new Headers((init && init.headers) || {});
    const token = storedToken();
    if (token) headers.set('Authorization', `Bearer ${token}`);
    const response = await fetch(url, { ...init, headers, cache: 'no-store' });
    if (response.status !== 401) return response;
    await askForToken(token);
  }
}

/** Shows the token form unless a newer token than `refused` is already stored. */
function askForToken(refused) {
  if (storedToken() !== refused) return Promise.resolve();
  if (tokenPrompt) return tokenPrompt;
  if (refused) sessionStorage.removeItem(TOKEN_KEY);
  tokenPrompt = new Promise((resolve) => {
    const dialog = $('#token-dialog');
    const input = $('#token-input');
    const error = $('#token-error');
    document.body.dataset.prompts = String(Number(document.body.dataset.prompts || 0) + 1);
    error.hidden = !refused;
    error.textContent = refused ? 'The daemon refused that token.' : '';
    input.value = '';
    dialog.hidden = false;
    input.focus();
    setPill('#conn', 'auth', 'token needed');
    $('#token-form').onsubmit = (event) => {
      event.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      input.value = '';
      dialog.hidden = true;
      tokenPrompt = null;
      $('#token-forget').hidden = false;
      resolve();
    };
  });
  return tokenPrompt;
}

/** One API call: the envelope's `data`, or an ApiError with the envelope's code and message. */
async function api(method, url, body) {
  const init = { method };
  if (body !== undefined && body !== null) {
    init.body = JSON.stringify(body);
    init.headers = { 'Content-Type': 'application/json' };
  }
  const response = await apiFetch(url, init);
  let envelope = null;
  try {
    envelope = await response.json();
  } catch (_) {
    envelope = null;
  }
  if (!response.ok || !envelope || envelope.success === false) {
    const error = envelope && envelope.error;
    throw new ApiError(
      response.status,
      error ? error.code : `HTTP_${response.status}`,
      error ? error.message : `${method} ${url}: ${response.status} ${response.statusText}`,
    );
  }
  return envelope.data;
}

// ---------------------------------------------------------------- polling

/** A loop that runs `fn` every `ms`, or at once when called (one run at a time). */
function poller(fn, ms) {
  let timer = null;
  let running = false;
  let again = false;
  const run = async () => {
    if (running) {
      again = true;
      return;
    }
    running = true;
    clearTimeout(timer);
    try {
      await fn();
    } catch (error) {
      setPill('#conn', 'error', `error: ${error.message}`);
    }
    running = false;
    if (again) {
      again = false;
      run();
    } else {
      timer = setTimeout(run, ms);
    }
  };
  return run;
}

async function refreshFast() {
  const [status, pools, allocations] = await Promise.all([
    api('GET', '/api/memory/status'),
    api('GET', '/api/memory/pools'),
    api('GET', `/api/memory/allocations?limit=${MAX_ALLOCATION_ROWS}`),
  ]);
  state.status = status;
  state.pools = pools;
  for (const d of status.devices) {
    const t = Date.parse(d.lastUpdated);
    if (!Number.isNaN(t)) {
      state.skew = t - Date.now();
      addSample(d.deviceId, t, d.memoryUtilization * 100);
    }
  }
  renderDevices();
  renderAllocations(allocations);
  renderPools();
  setPill('#conn', 'live', 'API: live');
  $('#last-refresh').textContent = `updated ${new Date().toLocaleTimeString([], { hour12: false })}`;
}

async function refreshSlow() {
  const [health, pressure, optimization] = await Promise.all([
    fetch('/health', { cache: 'no-store' }).then((r) => r.json()),
    api('GET', '/api/memory/pressure'),
    api('GET', '/api/memory/optimization'),
  ]);
  renderHealth(health && health.data);
  for (const p of pressure.devices) state.pressure.set(p.deviceId, p);
  renderRecommendations(optimization);
  // The listing asks every worker, so it may answer slower or fail alone.
  try {
    state.models = await api('GET', '/api/memory/models');
    state.modelsError = null;
  } catch (error) {
    state.modelsError = error;
  }
  renderModels();
  renderDevices();
}

const fast = poller(refreshFast, FAST_MS);
const slow = poller(refreshSlow, SLOW_MS);
const refreshAll = () => {
  fast();
  slow();
};

// ---------------------------------------------------------------- actions

/** Runs an action from a button: disables it meanwhile, reports the answer, refreshes. */
async function act(button, label, run) {
  button.disabled = true;
  try {
    const result = await run();
    toast(`${label}: ${summarize(result)}`);
  } catch (error) {
    toast(`${label} failed: ${error.code ? `${error.code}: ` : ''}${error.message}`, true);
  } finally {
    button.disabled = false;
    refreshAll();
  }
}

/** A short account of an answer's `data`. */
function summarize(d) {
  if (!d || typeof d !== 'object') return 'done';
  const parts = [];
  if (d.freedBytes !== undefined) parts.push(`freed ${fmtBytes(d.freedBytes)}`);
  if (d.clearedBytes !== undefined) parts.push(`returned ${fmtBytes(d.clearedBytes)} to the OS or driver`);
  if (d.bytesMoved !== undefined) parts.push(`moved ${fmtBytes(d.bytesMoved)}, released ${fmtBytes(d.bytesReleased || 0)}`);
  if (d.memoryFreed !== undefined) parts.push(`freed ${fmtBytes(d.memoryFreed)}`);
  if (d.action) parts.push(d.action);
  if (d.message) parts.push(d.message);
  return parts.length ? parts.join(', ') : 'done';
}

function actionButton(label, attrs, title, run) {
  const button = h('button', { type: 'button', title, ...attrs }, label);
  button.addEventListener('click', () => act(button, title, run));
  return button;
}

/** A destructive action: the first click arms it, a second within CONFIRM_MS runs it. */
function confirmButton(label, key, attrs, title, run) {
  const button = h('button', { type: 'button', class: 'danger', title, ...attrs }, label);
  const sync = () => {
    const left = (state.confirming.get(key) || 0) - Date.now();
    button.textContent = left > 0 ? `Confirm ${label.toLowerCase()}` : label;
    button.classList.toggle('confirming', left > 0);
    if (left > 0) setTimeout(sync, left + 50);
  };
  button.addEventListener('click', () => {
    if ((state.confirming.get(key) || 0) > Date.now()) {
      state.confirming.delete(key);
      sync();
      act(button, title, run);
    } else {
      state.confirming.set(key, Date.now() + CONFIRM_MS);
      sync();
    }
  });
  sync();
  return button;
}

// ---------------------------------------------------------------- header

function renderHealth(health) {
  if (!health) return;
  const el = $('#host-info');
  el.replaceChildren(`v${health.version} · up ${fmtDuration(health.uptimeSeconds)}`);
  for (const b of health.backends || []) {
    if (!b.available) {
      el.append(' · ', h('span', { title: b.reason || '' }, `${b.name}: unavailable`));
    }
  }
}

// ---------------------------------------------------------------- devices

/** Bytes of model memory on a device: held weights once, plus the models processes report. */
function modelBytes(deviceId) {
  const m = state.models;
  if (!m) return { bytes: null, count: 0 };
  const held = new Set((m.weights || []).map((w) => w.modelId));
  let bytes = 0;
  let count = 0;
  for (const w of m.weights || []) {
    if (w.deviceId === deviceId) {
      bytes += w.residentBytes || 0;
      count += 1;
    }
    // A parked copy lives in pinned host memory.
    if (deviceId === 'cpu' && w.deviceId !== 'cpu') bytes += w.parkedBytes || 0;
  }
  const dev = (m.devices || []).find((d) => d.deviceId === deviceId);
  for (const model of (dev && dev.modelMemory.loadedModels) || []) {
    if (held.has(model.modelId)) continue;
    bytes += (model.bytesByDevice && model.bytesByDevice[deviceId]) ?? model.sizeBytes ?? 0;
    count += 1;
  }
  return { bytes, count };
}

function deviceCard(deviceId) {
  let card = state.cards.get(deviceId);
  if (card) return card;
  const figure = (field, label, swatch) =>
    h('div', { class: 'figure' },
      h('div', { class: 'label' }, swatch ? h('i', { class: `swatch ${swatch}` }) : null, label),
      h('div', { class: 'value', dataset: { field } }, '–'),
      h('div', { class: 'sub', dataset: { field: `${field}-sub` } }));
  const segment = (field, cls) => h('div', { class: `seg ${cls}`, dataset: { segment: field } });
  const root = h('article', { class: 'device', dataset: { device: deviceId } },
    h('div', { class: 'device-head' },
      h('div', { class: 'device-title' },
        h('span', { class: 'id' }, deviceId),
        h('span', { class: 'badge', dataset: { field: 'pressure' } }, '…'),
        h('span', { class: 'devname', dataset: { field: 'name' } })),
      h('div', { class: 'device-actions' },
        actionButton('Clear cache', { dataset: { action: 'clear' } }, `clear ${deviceId}`,
          () => api('POST', `/api/memory/operations/clear/${path(deviceId)}`)),
        actionButton('Defragment', { dataset: { action: 'defragment' } }, `defragment ${deviceId}`,
          () => api('POST', `/api/memory/operations/defragment/${path(deviceId)}`)))),
    h('div', { class: 'device-body' },
      h('div', { class: 'device-memory' },
        h('div', { class: 'stack', role: 'img', 'aria-label': `memory of ${deviceId}` },
          segment('models', 'seg-models'), segment('pools', 'seg-pools'),
          segment('other', 'seg-other'), segment('free', 'seg-free')),
        h('div', { class: 'figures' },
          figure('models', 'models', 'seg-models'),
          figure('pools', 'memwarden pools', 'seg-pools'),
          figure('other', 'other processes', 'seg-other'),
          figure('free', 'free', 'seg-free')),
        h('div', { class: 'device-meta', dataset: { field: 'meta' } }),
        h('table', { class: 'procs', hidden: true },
          h('thead', {}, h('tr', {}, h('th', {}, 'pid'), h('th', {}, 'process'), h('th', { class: 'num' }, 'memory'))),
          h('tbody'))),
      h('div', { class: 'timeline', title: 'utilization over time, with the pressure thresholds and level changes' },
        svg('svg', { role: 'img', 'aria-label': `pressure of ${deviceId}` }))));
  card = { root, field: (name) => root.querySelector(`[data-field="${name}"]`) };
  state.cards.set(deviceId, card);
  return card;
}

function setFigure(card, field, bytes, sub) {
  const el = card.field(field);
  el.textContent = fmtBytes(bytes);
  el.dataset.bytes = bytes === null ? '' : String(bytes);
  card.field(`${field}-sub`).textContent = sub || '';
}

function renderDevices() {
  const status = state.status;
  if (!status) return;
  const container = $('#devices');
  const ids = status.devices.map((d) => d.deviceId);
  if (changed('device-order', ids)) {
    container.replaceChildren(...ids.map((id) => deviceCard(id).root));
    if (!ids.length) container.append(h('p', { class: 'empty' }, 'No devices.'));
  }
  for (const d of status.devices) {
    const card = deviceCard(d.deviceId);
    const root = card.root;
    const total = d.totalMemory;
    const models = modelBytes(d.deviceId);
    const modelsBytes = models.bytes || 0;
    const pools = d.reservedBytes;
    const other = Math.max(0, d.usedMemory - modelsBytes - pools);
    const free = d.availableMemory;
    root.dataset.lastUpdated = d.lastUpdated;
    for (const [key, value] of Object.entries({
      total: d.totalMemory, used: d.usedMemory, available: d.availableMemory,
      reserved: d.reservedBytes, allocated: d.allocatedBytes, reservations: d.reservationBytes,
      utilization: d.memoryUtilization,
    })) {
      root.dataset[key] = String(value);
    }
    card.field('name').textContent = d.name || '';
    card.field('name').title = d.name || '';
    setFigure(card, 'models', models.bytes,
      models.bytes === null ? 'listing…' : `${models.count} model${models.count === 1 ? '' : 's'}`);
    setFigure(card, 'pools', pools, `${fmtBytes(d.allocatedBytes)} allocated`);
    setFigure(card, 'other', other, `${fmtBytes(d.usedMemory)} used in all`);
    setFigure(card, 'free', free, `of ${fmtBytes(total)}`);
    const scale = Math.max(total, modelsBytes + pools + other + free, 1);
    for (const [field, bytes] of [['models', modelsBytes], ['pools', pools], ['other', other], ['free', free]]) {
      const seg = root.querySelector(`[data-segment="${field}"]`);
      seg.style.width = `${(bytes / scale) * 100}%`;
      seg.style.minWidth = bytes > 0 ? '3px' : '0';
      seg.title = `${field}: ${fmtBytes(bytes)}`;
    }
    const p = state.pressure.get(d.deviceId);
    const badge = card.field('pressure');
    const level = (p && p.pressureCategory) || 'unknown';
    badge.dataset.level = level;
    badge.textContent = p ? `${level} · ${p.pressureLevel}` : '…';
    badge.title = p && p.timeToCritical ? `critical in about ${Math.round(p.timeToCritical)} s at the current rate` : 'pressure level';
    const meta = [
      ['used', `${fmtPct(d.memoryUtilization)} of ${fmtBytes(total)}`],
      ['fragmentation', d.fragmentation.toFixed(2)],
    ];
    if (d.reservationBytes) meta.push(['reservations', fmtBytes(d.reservationBytes)]);
    if (d.computeCapability) meta.push(['compute', d.computeCapability]);
    if (d.pciBusId) meta.push(['PCI', d.pciBusId]);
    if (d.uuid) meta.push(['UUID', d.uuid]);
    meta.push(['source', d.source]);
    const metaEl = card.field('meta');
    metaEl.replaceChildren(...meta.map(([k, v]) => h('span', {}, `${k} `, h('b', {}, v))));
    if (!d.healthy) metaEl.prepend(h('span', { class: 'badge unhealthy', title: d.lastError || '' }, 'unhealthy'));
    renderProcesses(card, d);
    drawTimeline(card, d.deviceId);
  }
}

function renderProcesses(card, d) {
  const table = card.root.querySelector('.procs');
  const procs = (d.processes || []).slice().sort((a, b) => b.usedMemory - a.usedMemory);
  table.hidden = procs.length === 0;
  if (!changed(`procs-${d.deviceId}`, procs)) return;
  table.tBodies[0].replaceChildren(...procs.slice(0, 8).map((p) =>
    h('tr', { dataset: { pid: p.pid } },
      h('td', { class: 'mono' }, p.pid), h('td', {}, p.name || '?'), h('td', { class: 'num' }, fmtBytes(p.usedMemory)))));
}

// ---------------------------------------------------------------- pressure timeline

function addSample(deviceId, t, u) {
  const list = state.samples.get(deviceId) || [];
  if (list.length && list[list.length - 1].t >= t) {
    // Out of order (an event stamped before the last poll): keep the list sorted.
    const i = list.findIndex((s) => s.t > t);
    list.splice(i < 0 ? list.length : i, 0, { t, u });
  } else {
    list.push({ t, u });
  }
  const from = serverNow() - WINDOW_MS - 60000;
  while (list.length && list[0].t < from) list.shift();
  state.samples.set(deviceId, list);
}

function drawTimeline(card, deviceId) {
  const el = card.root.querySelector('.timeline svg');
  // Drawn at the element's own size, so text and markers keep their shape.
  const W = Math.max(280, Math.round(el.getBoundingClientRect().width) || 600);
  const H = 140, L = 34, R = 8, T = 6, B = 18;
  el.setAttribute('viewBox', `0 0 ${W} ${H}`);
  const now = serverNow();
  // The page keeps what it saw since it opened: the span grows from MIN_SPAN_MS to WINDOW_MS.
  const seen = (state.samples.get(deviceId) || [])[0];
  const span = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, seen ? now - seen.t : 0));
  const t0 = now - span;
  const x = (t) => L + ((t - t0) / span) * (W - L - R);
  const y = (u) => T + (1 - Math.min(100, Math.max(0, u)) / 100) * (H - T - B);
  const children = [];
  const p = state.pressure.get(deviceId);
  const th = p && p.thresholds;
  if (th) {
    const bounds = [th.moderate, th.high, th.critical, 1].map((v) => v * 100);
    ['moderate', 'high', 'critical'].forEach((name, i) => {
      const top = y(bounds[i + 1]);
      children.push(svg('rect', { class: `band ${name}`, x: L, y: top, width: W - L - R, height: Math.max(0, y(bounds[i]) - top) }));
    });
  }
  for (const u of [0, 50, 100]) {
    children.push(svg('line', { class: 'grid', x1: L, x2: W - R, y1: y(u), y2: y(u) }));
    children.push(svg('text', { class: 'axis', x: L - 4, y: y(u) + 3, 'text-anchor': 'end' }, `${u}%`));
  }
  if (th) {
    for (const name of ['moderate', 'high', 'critical']) {
      const v = th[name] * 100;
      children.push(svg('line', {
        class: `threshold ${name}`, x1: L, x2: W - R, y1: y(v), y2: y(v),
        dataset: { threshold: name, value: th[name] },
      }, svg('title', {}, `${name}: ${v.toFixed(0)} %`)));
    }
  }
  const samples = (state.samples.get(deviceId) || []).filter((s) => s.t >= t0 - 5000);
  if (samples.length) {
    const points = samples.map((s) => `${x(Math.max(s.t, t0)).toFixed(1)},${y(s.u).toFixed(1)}`);
    const last = samples[samples.length - 1];
    const first = samples[0];
    children.push(svg('polygon', {
      class: 'util-area',
      points: `${x(Math.max(first.t, t0)).toFixed(1)},${y(0)} ${points.join(' ')} ${x(last.t).toFixed(1)},${y(0)}`,
    }));
    children.push(svg('polyline', { class: 'util', points: points.join(' ') }));
  }
  for (const m of (state.markers.get(deviceId) || []).filter((mk) => mk.t >= t0)) {
    children.push(svg('circle', {
      class: `marker ${m.level}`, cx: x(m.t), cy: y(m.u), r: 4.5,
      dataset: { level: m.level, from: m.from },
    }, svg('title', {}, `${fmtClock(m.t)}: ${m.from} → ${m.level} at ${m.u.toFixed(1)} %`)));
  }
  for (const [ago, anchor] of [[span, 'start'], [span / 2, 'middle'], [0, 'end']]) {
    const minutes = Math.round(ago / 6000) / 10;
    children.push(svg('text', { class: 'axis', x: x(now - ago), y: H - 4, 'text-anchor': anchor },
      ago ? `−${minutes} min` : 'now'));
  }
  el.replaceChildren(...children);
}

// ---------------------------------------------------------------- the event stream

async function streamEvents() {
  let delay = 1000;
  for (;;) {
    try {
      const response = await apiFetch('/api/memory/events', { headers: { Accept: 'text/event-stream' } });
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      setPill('#stream', 'live', 'events: live');
      document.body.dataset.streamConnects = String(Number(document.body.dataset.streamConnects || 0) + 1);
      delay = 1000;
      loadHistory();
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        // Frames end with a blank line (the daemon writes LF line ends; CRLF is accepted).
        let match;
        while ((match = /\r?\n\r?\n/.exec(buffer))) {
          handleFrame(buffer.slice(0, match.index));
          buffer = buffer.slice(match.index + match[0].length);
        }
      }
      setPill('#stream', 'reconnecting', 'events: ended, reconnecting');
    } catch (error) {
      setPill('#stream', 'reconnecting', `events: ${error.message}, reconnecting`);
    }
    await sleep(delay);
    delay = Math.min(delay * 2, 15000);
  }
}

/** One server-sent event frame: `event:` and `data:` lines; comments (keep-alives) skipped. */
function handleFrame(frame) {
  let event = 'message';
  const data = [];
  for (const line of frame.split(/\r?\n/)) {
    if (!line || line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
  }
  if (!data.length) return;
  let payload;
  try {
    payload = JSON.parse(data.join('\n'));
  } catch (_) {
    return;
  }
  document.body.dataset.streamEvents = String(Number(document.body.dataset.streamEvents || 0) + 1);
  if (event === 'pressure') onPressure(payload, true);
  else if (event === 'optimization') onOptimization(payload);
}

async function loadHistory() {
  try {
    const history = await api('GET', '/api/memory/pressure/history');
    for (const e of history.events) onPressure(e, false);
  } catch (_) {
    // The stream still runs; the history only fills in what came before it.
  }
}

function onPressure(e, live) {
  const key = `${e.deviceId}|${e.timestamp}|${e.newLevel}`;
  if (state.seenEvents.has(key)) return;
  if (state.seenEvents.size > 10000) state.seenEvents.clear(); // a page left open for weeks
  state.seenEvents.add(key);
  const t = Date.parse(e.timestamp);
  const markers = state.markers.get(e.deviceId) || [];
  markers.push({ t, u: e.utilizationPercentage, level: e.newLevel, from: e.oldLevel });
  markers.sort((a, b) => a.t - b.t);
  state.markers.set(e.deviceId, markers.filter((m) => m.t >= serverNow() - WINDOW_MS));
  // A change from before the page opened is a marker; the line only joins what the page saw.
  if (live) addSample(e.deviceId, t, e.utilizationPercentage);
  const p = state.pressure.get(e.deviceId);
  if (live && p && t >= Date.parse(p.sampledAt)) p.pressureCategory = e.newLevel;
  const rising = LEVELS.indexOf(e.newLevel) > LEVELS.indexOf(e.oldLevel);
  addEvent(h('li', {
    dataset: { event: 'pressure', device: e.deviceId, oldLevel: e.oldLevel, newLevel: e.newLevel, live: live ? '1' : '0' },
    'data-t': t,
  },
  h('span', { class: 'time' }, fmtClock(t)),
  h('span', { class: 'dev' }, e.deviceId),
  h('span', {}, `${rising ? '▲' : '▼'} `, h('span', { class: 'badge', dataset: { level: e.oldLevel } }, e.oldLevel), ' → ',
    h('span', { class: 'badge', dataset: { level: e.newLevel } }, e.newLevel)),
  h('span', { class: 'muted' }, `${e.utilizationPercentage.toFixed(1)} % used, ${fmtBytes(e.availableMemory)} available`)), t);
  if (live) renderDevices();
}

function onOptimization(o) {
  const t = Date.parse(o.startedAt) || serverNow();
  addEvent(h('li', { dataset: { event: 'optimization', device: o.deviceId }, 'data-t': t },
    h('span', { class: 'time' }, fmtClock(t)),
    h('span', { class: 'dev' }, o.deviceId),
    h('span', {}, `optimizer (${o.trigger}, ${o.optimizationStrategy}): freed ${fmtBytes(o.memoryFreed)}`),
    h('span', { class: 'muted' }, o.message)), t);
  slow();
}

function addEvent(li, t) {
  const list = $('#events');
  const empty = list.querySelector('.empty');
  if (empty) empty.remove();
  // Newest first, in time order also when the history arrives after live events.
  const later = [...list.children].find((other) => Number(other.dataset.t) < t);
  list.insertBefore(li, later || null);
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
}

// ---------------------------------------------------------------- models

function renderModels() {
  const m = state.models;
  const coordination = $('#models-coordination');
  const body = $('#models tbody');
  if (state.modelsError) {
    coordination.textContent = `The model listing failed: ${state.modelsError.code}: ${state.modelsError.message}`;
    coordination.classList.add('error');
    return;
  }
  coordination.classList.remove('error');
  if (!m) return;
  const rows = [];
  const held = new Set();
  for (const w of m.weights || []) {
    held.add(w.modelId);
    rows.push({
      id: w.modelId, name: w.name, device: w.deviceId, heldBy: 'memwarden',
      heldSub: w.holders && w.holders.length ? `mapped by ${w.holders.join(', ')}` : 'no holder',
      state: w.state, size: w.sizeBytes,
      sizeSub: w.parkedBytes ? `${fmtBytes(w.parkedBytes)} parked` : w.residentBytes !== w.sizeBytes ? `${fmtBytes(w.residentBytes)} resident` : '',
      priority: w.priority, pinned: w.pinned, lastUsed: w.lastUsed, held: true,
    });
  }
  for (const dev of m.devices || []) {
    for (const model of dev.modelMemory.loadedModels || []) {
      if (held.has(model.modelId)) continue;
      rows.push({
        id: model.modelId, name: model.modelName, device: model.deviceId, heldBy: model.workerId,
        heldSub: [model.backend, model.pid ? `pid ${model.pid}` : null].filter(Boolean).join(', '),
        state: 'loaded', size: model.sizeBytes, sizeSub: '',
        priority: model.priority, pinned: model.pinned, lastUsed: model.lastAccess, held: false,
      });
    }
  }
  const c = m.coordinationStatus;
  const ready = (c.workers || []).filter((w) => w.state === 'ready').length;
  coordination.textContent = c.mode === 'coordinated'
    ? `Workers: ${ready} of ${(c.workers || []).length} ready${c.synchronized ? '' : ' (not every worker answered)'}.`
    : `Workers: none to ask (${c.reason || 'fallback'}); models memwarden holds are still listed.`;
  const total = rows.reduce((sum, r) => sum + (r.size || 0), 0);
  $('#models-summary').textContent = `${rows.length} model${rows.length === 1 ? '' : 's'}, ${fmtBytes(total)}`;
  if (!changed('models', [rows, Math.floor(Date.now() / 30000)])) return;
  if (!rows.length) {
    body.replaceChildren(h('tr', {}, h('td', { colspan: 8, class: 'empty-row' }, 'No models loaded.')));
    return;
  }
  body.replaceChildren(...rows.map((r) => {
    const actions = [];
    const base = `/api/memory/models/${path(r.id)}`;
    if (r.held && r.state === 'resident' && r.device !== 'cpu' && !r.pinned) {
      actions.push(actionButton('Park', { dataset: { action: 'park' } }, `park ${r.id}`, () => api('POST', `${base}/park`)));
    }
    if (r.held && (r.state === 'parked' || r.state === 'dropped')) {
      actions.push(actionButton('Resume', { dataset: { action: 'resume' } }, `resume ${r.id}`, () => api('POST', `${base}/resume`)));
    }
    actions.push(confirmButton('Unload', `unload ${r.id}`, { dataset: { action: 'unload' } }, `unload ${r.id}`,
      () => api('DELETE', base)));
    return h('tr', { dataset: { modelId: r.id, state: r.state } },
      h('td', {}, r.name || r.id, h('span', { class: 'sub mono' }, r.id)),
      h('td', { class: 'mono' }, r.device),
      h('td', {}, r.heldBy, h('span', { class: 'sub' }, r.heldSub)),
      h('td', {}, h('span', { class: 'state', dataset: { state: r.state } }, r.state), r.pinned ? h('span', { class: 'sub' }, 'pinned') : null),
      h('td', { class: 'num', dataset: { bytes: r.size } }, fmtBytes(r.size), r.sizeSub ? h('span', { class: 'sub' }, r.sizeSub) : null),
      h('td', { class: 'num' }, r.priority ?? '–'),
      h('td', {}, fmtAgo(r.lastUsed)),
      h('td', { class: 'actions' }, actions));
  }));
}

// ---------------------------------------------------------------- recommendations

function renderRecommendations(o) {
  const list = $('#recommendations');
  const recs = o.recommendations || [];
  $('#recommendations-summary').textContent = recs.length
    ? `${recs.length}, about ${fmtBytes(o.totalEstimatedSavingsBytes)} to gain`
    : '';
  if (!changed('recommendations', recs.map(({ type, priority, deviceId, message, action, estimatedSavingsBytes }) =>
    ({ type, priority, deviceId, message, action, estimatedSavingsBytes })))) return;
  if (!recs.length) {
    list.replaceChildren(h('li', { class: 'empty' }, 'Nothing to do: no rule has evidence right now.'));
    return;
  }
  list.replaceChildren(...recs.map((r) => {
    const a = r.action || {};
    const route = `${a.method} ${a.path}${a.body ? ` ${JSON.stringify(a.body)}` : ''}`;
    return h('li', { dataset: { type: r.type, device: r.deviceId, priority: r.priority } },
      h('span', { class: `badge prio-${r.priority}` }, r.priority),
      h('span', { class: 'what' }, `${r.type} · ${r.deviceId}`,
        r.estimatedSavingsBytes ? h('span', { class: 'muted' }, ` · ${fmtBytes(r.estimatedSavingsBytes)}`) : null),
      actionButton('Apply', { class: 'primary', dataset: { action: 'apply' } }, `${r.type} on ${r.deviceId}`,
        () => api(a.method, a.path, a.body)),
      h('span', { class: 'msg' }, r.message),
      h('span', { class: 'route' }, route));
  }));
}

// ---------------------------------------------------------------- allocations

function renderAllocations(page) {
  const body = $('#allocations tbody');
  const shown = page.allocations.length;
  $('#allocations-summary').textContent = `${page.count} live, ${fmtBytes(page.totalBytes)}` +
    (page.count > shown ? ` (the oldest ${shown} shown)` : '');
  if (!changed('allocations', [page.allocations, Math.floor(Date.now() / 30000)])) return;
  if (!shown) {
    body.replaceChildren(h('tr', {}, h('td', { colspan: 8, class: 'empty-row' }, 'No live allocations.')));
    return;
  }
  body.replaceChildren(...page.allocations.map((a) => h('tr', { dataset: { allocationId: a.allocationId } },
    h('td', { class: 'mono', title: a.allocationId }, shortId(a.allocationId),
      a.exported ? h('span', { class: 'sub' }, 'exported') : null),
    h('td', { class: 'mono' }, a.deviceId),
    h('td', {}, a.memoryType),
    h('td', { class: 'num', dataset: { bytes: a.sizeBytes } }, fmtBytes(a.sizeBytes)),
    h('td', {}, a.owner || h('span', { class: 'muted' }, '–'), a.ownerPid ? h('span', { class: 'sub' }, `pid ${a.ownerPid}`) : null),
    h('td', {}, a.purpose || h('span', { class: 'muted' }, '–')),
    h('td', {}, fmtAgo(a.allocatedAt)),
    h('td', { class: 'actions' }, confirmButton('Free', `free ${a.allocationId}`, { dataset: { action: 'free' } },
      `free ${shortId(a.allocationId)}`, () => api('DELETE', `/api/memory/allocations/${path(a.allocationId)}`))))));
}

// ---------------------------------------------------------------- pool blocks

function renderPools() {
  const container = $('#pools');
  const devices = (state.pools && state.pools.devices) || [];
  if (!changed('pools', devices)) return;
  const sections = [];
  for (const d of devices) {
    for (const p of d.pools) {
      if (!p.blocks.length) continue;
      sections.push(h('div', { class: 'pool', dataset: { device: d.deviceId, memoryType: p.memoryType } },
        h('div', { class: 'pool-head' },
          h('span', { class: 'title' }, `${d.deviceId} ${p.memoryType}`),
          h('span', {}, `${p.blockCount} block${p.blockCount === 1 ? '' : 's'}, ${fmtBytes(p.reservedBytes)} held, ` +
            `${fmtBytes(p.allocatedBytes)} allocated, ${fmtBytes(p.freeInPoolBytes)} free in ${p.freeRangeCount} ` +
            `range${p.freeRangeCount === 1 ? '' : 's'}, largest ${fmtBytes(p.largestFreeBlock)}, ` +
            `fragmentation ${p.fragmentation.toFixed(2)}`)),
        p.blocks.map((b) => blockRow(b))));
    }
  }
  if (!sections.length) {
    sections.push(h('p', { class: 'empty' }, 'No pool blocks: memwarden holds no pooled memory right now.'));
  }
  container.replaceChildren(...sections);
}

/** One block as a bar of its ranges in address order (cells when there are very many). */
function blockRow(b) {
  const used = b.ranges.filter((r) => !r.free).reduce((sum, r) => sum + r.sizeBytes, 0);
  const bar = h('div', { class: 'blockbar', title: `block ${b.blockId} at ${b.address}` });
  const size = Math.max(1, b.sizeBytes);
  if (b.ranges.length <= 400) {
    for (const r of b.ranges) {
      const seg = h('div', {
        class: `r ${r.free ? 'free' : 'used'}`,
        title: r.free ? `free: ${fmtBytes(r.sizeBytes)} at +${fmtBytes(r.offset)}`
          : `${r.allocationId}: ${fmtBytes(r.sizeBytes)} at +${fmtBytes(r.offset)}`,
        dataset: r.free ? {} : { allocationId: r.allocationId },
      });
      seg.style.width = `${(r.sizeBytes / size) * 100}%`;
      bar.append(seg);
    }
  } else {
    const cells = 160;
    const cell = size / cells;
    const fill = new Array(cells).fill(0);
    for (const r of b.ranges.filter((x) => !x.free)) {
      const end = r.offset + r.sizeBytes;
      for (let i = Math.floor(r.offset / cell); i < cells && i * cell < end; i++) {
        fill[i] += Math.max(0, Math.min(end, (i + 1) * cell) - Math.max(r.offset, i * cell));
      }
    }
    for (const f of fill) {
      const seg = h('div', { class: 'r used' });
      seg.style.width = `${100 / cells}%`;
      seg.style.opacity = String(Math.max(0.08, f / cell));
      bar.append(seg);
    }
    bar.title += `: ${b.ranges.length} ranges, shaded by use`;
  }
  return h('div', { class: 'block', dataset: { blockId: b.blockId } },
    h('span', { class: 'label' }, `block ${b.blockId}`, b.dedicated ? '*' : ''),
    bar,
    h('span', { class: 'pct' }, `${fmtBytes(b.sizeBytes)} · ${Math.floor((used * 100) / size)} % used${b.dedicated ? ' · dedicated' : ''}`));
}

// ---------------------------------------------------------------- start

function start() {
  $('#events').append(h('li', { class: 'empty' }, 'No pressure changes yet.'));
  const forget = $('#token-forget');
  forget.hidden = !storedToken();
  forget.addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    window.location.reload();
  });
  fast();
  slow();
  streamEvents();
  // Keep the timelines moving between polls.
  setInterval(() => {
    for (const [id, card] of state.cards) drawTimeline(card, id);
  }, 5000);
}

document.addEventListener('DOMContentLoaded', start);
