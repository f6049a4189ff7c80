// SPDX-License-Identifier: AGPL-3.0-or-later
// Admin page of orthanc-ai: plain JS over the JSON API of the plugin (relative URLs from /ai/ui/),
// no framework, no build step, nothing loaded from outside Orthanc. Only what the API returns is
// shown; it carries no patient names or IDs, and this page adds none.
'use strict';

const API = '../';
const REFRESH_MS = 3000;
// The worker's stages in order (orthanc_plugin/worker.py); fhir_build only when the pipeline sends FHIR.
const STAGES = ['fetch', 'volume', 'preprocess', 'inference', 'postprocess', 'seg_encode', 'sr_encode',
  'fhir_build', 'store'];

const $ = (id) => document.getElementById(id);
let timer = null;
let inflight = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

async function api(path, options) {
  const r = await fetch(API + path, { credentials: 'same-origin', headers: { Accept: 'application/json' }, ...options });
  let body = null;
  const text = await r.text();
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = { error: text.slice(0, 300) }; }
  return { status: r.status, ok: r.ok, body };
}

function showMessage(text, kind) {
  const m = $('message');
  m.textContent = text;
  m.className = kind === 'info' ? 'info' : '';
  m.hidden = !text;
}

function seconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return '';
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${Math.round(s - 60 * m)} s`;
}

function stagesCell(job) {
  const timings = job.timings || {};
  const names = STAGES.filter((s) => s !== 'fhir_build' || s in timings || job.stage === s);
  for (const s of Object.keys(timings)) if (!names.includes(s) && s !== 'total') names.push(s);
  const box = el('div', { class: 'stages' });
  const next = job.state === 'running' ? names.find((n) => !(n in timings)) : null;  // the stage under way
  for (const s of names) {
    const done = s in timings;
    const current = s === next;
    const label = done ? `${s} ${timings[s].toFixed(2)} s` : s;
    box.append(el('span', { class: `stage${done ? ' done' : ''}${current ? ' current' : ''}`, title: label, 'data-stage': s, text: label }));
  }
  return box;
}

function duration(job) {
  if (job.duration_s !== null && job.duration_s !== undefined) return seconds(job.duration_s);
  if (job.state === 'running' && job.started) return `${seconds(Date.now() / 1000 - job.started)} so far`;
  return '';
}

async function act(job, verb) {
  if (verb === 'cancel' && !window.confirm(`Cancel job ${job.id}?`)) return;
  const r = await api(`jobs/${encodeURIComponent(job.id)}/${verb}`, { method: 'POST' });
  if (r.ok) showMessage(`Job ${job.id}: ${verb} done, now ${r.body.state}.`, 'info');
  else showMessage(`Job ${job.id}: ${verb} refused (HTTP ${r.status}): ${(r.body && r.body.error) || 'no detail'}`);
  await refresh();
}

function jobRow(job) {
  const series = Object.entries(job.series || {}).map(([role, s]) => el('div', { class: 'uid', title: s.reason || '' },
    `${role}: ${s.series_description || '(no description)'} — ${s.instances} images`, el('br'), s.series_uid || ''));
  const finished = ['succeeded', 'failed', 'cancelled'].includes(job.state);
  return el('tr', { 'data-job-id': job.id, 'data-state': job.state, 'data-pipeline': job.pipeline },
    el('td', {}, el('span', { class: `state state-${job.state}`, text: job.state }),
      job.urgent ? el('span', { class: 'badge urgent', title: job.urgent, text: 'urgent' }) : '',
      job.deferred_until
        ? el('span', { class: 'badge deferred', text: `waits until ${new Date(job.deferred_until * 1000).toLocaleString()}` })
        : ''),
    el('td', {}, `${job.pipeline} `, el('span', { class: 'muted', text: job.pipeline_version })),
    el('td', { class: 'uid', text: job.study.StudyInstanceUID }),
    el('td', { class: 'uid' }, ...series),
    el('td', {}, stagesCell(job)),
    el('td', { text: duration(job) }),
    el('td', { text: `${job.attempts} / ${job.max_attempts}` }),
    el('td', { class: 'error', text: job.error || '' }),
    el('td', {},
      el('button', { type: 'button', class: 'action retry', disabled: !finished, onclick: () => act(job, 'retry') }, 'Retry'),
      el('button', { type: 'button', class: 'action cancel', disabled: finished, onclick: () => act(job, 'cancel') }, 'Cancel')));
}

async function loadJobs() {
  const state = $('state-filter').value;
  const r = await api(`jobs?limit=200${state ? `&state=${encodeURIComponent(state)}` : ''}`);
  if (!r.ok) throw new Error(`GET /ai/jobs: HTTP ${r.status} ${(r.body && r.body.error) || ''}`);
  $('jobs-body').replaceChildren(...r.body.map(jobRow));
  if (!r.body.length) $('jobs-body').append(el('tr', {}, el('td', { colspan: 9, class: 'muted', text: 'no jobs' })));
  $('job-count').textContent = `${r.body.length} job(s) shown`;
}

async function loadPipelines() {
  const [pipes, done] = await Promise.all([api('pipelines'), api('jobs?state=succeeded&limit=200')]);
  if (!pipes.ok) throw new Error(`GET /ai/pipelines: HTTP ${pipes.status}`);
  const used = {};
  for (const j of (done.ok ? done.body : [])) {  // newest first: keep the first per pipeline
    const m = j.outputs && j.outputs.model;
    if (m && !(j.pipeline in used)) used[j.pipeline] = `${m.version} (${m.name})`;
  }
  $('pipelines-body').replaceChildren(...pipes.body.map((p) => el('tr', { 'data-pipeline': p.name },
    el('td', { title: p.description || '' }, p.name),
    el('td', { text: p.version }),
    el('td', { class: p.enabled ? 'ok' : 'bad', text: p.enabled ? 'yes' : 'no' }),
    el('td', { text: p.model.name }),
    el('td', { text: p.model.version }),
    el('td', { class: 'model-used', text: used[p.name] || '—' }))));
}

async function loadHealth() {
  const r = await api('health');  // 503 with the same JSON when something is down
  const h = r.body || {};
  const q = h.queue || {};
  const w = h.workers || {};
  const t = h.triton || {};
  const yes = (ok, text) => el('dd', { class: ok ? 'ok' : 'bad', text });
  $('health-body').replaceChildren(
    el('dt', { text: 'overall' }), yes(!!h.ok, h.ok ? 'ok' : `degraded (HTTP ${r.status})`),
    el('dt', { text: 'Triton' }), yes(!!t.ready, t.ready ? 'ready' : 'not ready'),
    el('dt', { text: 'workers' }), yes(w.alive === w.expected, `${w.alive ?? '?'} / ${w.expected ?? '?'} alive`),
    el('dt', { text: 'queue' }), el('dd', { id: 'health-queue', text: Object.entries(q).map(([k, v]) => `${k} ${v}`).join(', ') }),
    el('dt', { text: 'FHIR backlog' }), el('dd', { id: 'health-fhir', text: String(h.fhir_backlog ?? '?') }));
  document.getElementById('health').dataset.ready = t.ready ? 'true' : 'false';
}

// ---------------------------------------------------------------- Review view

let viewerUrl;  // undefined until asked; null when no viewer is configured (OrthancAI.ViewerUrl)

async function loadViewer() {
  if (viewerUrl !== undefined) return;
  const r = await api('viewer');
  viewerUrl = r.ok && r.body ? r.body.url : null;
}

function measurementsText(job) {
  const ms = (job.outputs && job.outputs.measurements) || [];
  return ms.map((m) => `${m.segment} ${m.volume_ml.toFixed(1)} mL`).join(', ') || 'no findings';
}

async function review(job, decision, reasonInput) {
  const reason = reasonInput.value.trim();
  const r = await api(`jobs/${encodeURIComponent(job.id)}/review`, {
    method: 'POST',
    headers: { Accept: 'application/json', 'Content-Type': 'application/json' },
    body: JSON.stringify(reason ? { decision, reason } : { decision }),
  });
  if (r.ok) showMessage(`Job ${job.id}: ${r.body.review.state} (review ${r.body.review.n}).`, 'info');
  else showMessage(`Job ${job.id}: ${decision} refused (HTTP ${r.status}): ${(r.body && r.body.error) || 'no detail'}`);
  await refresh();
}

function reviewRow(job) {
  const uid = job.study.StudyInstanceUID;
  const reason = el('input', { type: 'text', class: 'reason', maxlength: 1000, placeholder: 'reason (needed to reject)',
    'aria-label': `reason for job ${job.id}` });
  const link = viewerUrl
    ? el('a', { class: 'open-viewer', href: `${viewerUrl}/segmentation?StudyInstanceUIDs=${encodeURIComponent(uid)}`,
      target: '_blank', rel: 'noopener' }, 'Open in OHIF')
    : el('span', { class: 'muted', title: 'set OrthancAI.ViewerUrl', text: 'no viewer configured' });
  return el('tr', { 'data-job-id': job.id, 'data-pipeline': job.pipeline },
    el('td', { text: job.finished ? new Date(job.finished * 1000).toLocaleString() : '' }),
    el('td', {}, `${job.pipeline} `, el('span', { class: 'muted', text: job.pipeline_version })),
    el('td', { class: 'uid', text: uid }),
    el('td', { class: 'measurements', text: measurementsText(job) }),
    el('td', {}, link),
    el('td', {}, reason),
    el('td', {},
      el('button', { type: 'button', class: 'action accept', onclick: () => review(job, 'accept', reason) }, 'Accept'),
      el('button', { type: 'button', class: 'action reject', onclick: () => review(job, 'reject', reason) }, 'Reject')));
}

async function loadReview() {
  await loadViewer();
  const r = await api('jobs?review=pending&limit=200');
  if (!r.ok) throw new Error(`GET /ai/jobs?review=pending: HTTP ${r.status} ${(r.body && r.body.error) || ''}`);
  // Keep what a reviewer is typing: a refresh must not wipe a half-written reason.
  const typing = {};
  for (const input of $('review-body').querySelectorAll('input.reason')) {
    if (input.value) typing[input.closest('tr').dataset.jobId] = input.value;
  }
  const rows = r.body.map(reviewRow);
  for (const row of rows) if (typing[row.dataset.jobId]) row.querySelector('input.reason').value = typing[row.dataset.jobId];
  $('review-body').replaceChildren(...rows);
  if (!r.body.length) $('review-body').append(el('tr', {}, el('td', { colspan: 7, class: 'muted', text: 'nothing waits for review' })));
  $('review-count').textContent = `(${r.body.length})`;
  $('review').dataset.loaded = 'true';
}

// ---------------------------------------------------------------- Models view

const charts = [];
const COLORS = { accepted: '#1e8a3c', edited: '#d68910', rejected: '#c0392b', unreviewed: '#95a5a6',
  reference: '#5b7fa6', recent: '#e67e22' };
const STATE_TEXT = { ok: 'stable', warn: 'shift worth a look', alert: 'ALERT: departs from the reference',
  insufficient: 'too few jobs to compare' };

function chart(canvas, config) {
  config.options = { animation: false, responsive: false, plugins: { legend: { position: 'bottom' } }, ...config.options };
  charts.push(new window.Chart(canvas, config));
}

function binLabels(h, digits) {
  return h.counts.map((_, i) => `${h.edges[i].toFixed(digits)}–${h.edges[i + 1].toFixed(digits)}`);
}

function proportions(counts) {
  const n = counts.reduce((a, b) => a + b, 0);
  return counts.map((c) => (n ? c / n : 0));
}

function card(title, state, detail) {
  const canvas = el('canvas', { width: 380, height: 220 });
  const box = el('figure', { class: `chart${state ? ` drift-${state}` : ''}`, 'data-title': title },
    el('figcaption', {}, el('strong', { text: title }), detail ? el('span', { class: 'muted', text: ` ${detail}` }) : '',
      state ? el('span', { class: `badge drift ${state}`, text: STATE_TEXT[state] || state }) : ''),
    canvas);
  return [box, canvas];
}

function histogramCard(title, summary, label, digits, color) {
  const detail = summary.n ? `n ${summary.n}, median ${summary.median.toFixed(digits)}` : 'no values yet';
  const [box, canvas] = card(title, null, detail);
  chart(canvas, { type: 'bar', data: { labels: binLabels(summary.histogram, digits),
    datasets: [{ label, data: summary.histogram.counts, backgroundColor: color }] } });
  return box;
}

function versionSection(model, v) {
  const drift = v.drift;
  const section = el('section', { class: 'version', 'data-version': v.version, 'data-alert': drift.alert ? 'true' : 'false',
    'data-state': drift.state });
  const w = drift.windows;
  section.append(el('h3', {}, `${model} version ${v.version} `, el('span', { class: 'muted', text: `${v.jobs} succeeded job(s)` }),
    el('span', { class: `badge drift ${drift.state}`, text: STATE_TEXT[drift.state] })));
  section.append(el('p', { class: 'muted', text: `Drift: the last ${w.recent.jobs} job(s) against the first ${w.reference.jobs}.` }));
  const grid = el('div', { class: 'charts' });
  section.append(grid);

  const [reviews, c1] = card('Reviews', null, Object.entries(v.counts).map(([k, n]) => `${k} ${n}`).join(', '));
  chart(c1, { type: 'bar', data: { labels: Object.keys(v.counts),
    datasets: [{ label: 'jobs', data: Object.values(v.counts), backgroundColor: Object.keys(v.counts).map((k) => COLORS[k]) }] },
  options: { plugins: { legend: { display: false } } } });
  grid.append(reviews);
  const hours = { ...v.review_seconds, median: v.review_seconds.median === null ? null : v.review_seconds.median / 3600,
    histogram: { edges: v.review_seconds.histogram.edges.map((e) => e / 3600), counts: v.review_seconds.histogram.counts } };
  grid.append(histogramCard('Time to review (hours)', hours, 'reviews', 1, '#5b7fa6'));
  grid.append(histogramCard('Edits: Dice of AI and edited segment', v.edit_dice, 'edited segments', 2, '#d68910'));
  grid.append(histogramCard('Edits: volume change (%)', v.edit_volume_diff_pct, 'edited segments', 0, '#8e44ad'));

  for (const x of drift.input_drift) {
    const [box, canvas] = card(`Input: ${x.attribute}`, x.state, `PSI ${x.statistic.toFixed(3)}`);
    box.dataset.kind = 'input';
    chart(canvas, { type: 'bar', data: { labels: x.categories, datasets: [
      { label: `reference (${x.reference_n})`, data: proportions(x.reference), backgroundColor: COLORS.reference },
      { label: `recent (${x.recent_n})`, data: proportions(x.recent), backgroundColor: COLORS.recent }] },
    options: { scales: { y: { title: { display: true, text: 'share of jobs' } } } } });
    grid.append(box);
  }
  for (const x of drift.output_drift) {
    const p = x.p_value === null ? '' : `, p ${x.p_value < 0.001 ? x.p_value.toExponential(1) : x.p_value.toFixed(3)}`;
    const [box, canvas] = card(`Output: ${x.measurement}`, x.state, `KS D ${x.statistic.toFixed(3)}${p}`);
    box.dataset.kind = 'output';
    chart(canvas, { type: 'bar', data: { labels: binLabels(x.reference, 1), datasets: [
      { label: `reference (${x.reference_n})`, data: proportions(x.reference.counts), backgroundColor: COLORS.reference },
      { label: `recent (${x.recent_n})`, data: proportions(x.recent.counts), backgroundColor: COLORS.recent }] },
    options: { scales: { y: { title: { display: true, text: 'share of jobs' } } } } });
    grid.append(box);
  }
  return section;
}

// One load of the Models view at a time: a second request (hash change, Refresh) waits for the
// first and then draws again, so charts are never destroyed while they are being drawn.
let modelsLoading = null;
async function loadModels() {
  while (modelsLoading) await modelsLoading.catch(() => {});
  modelsLoading = drawModels();
  try { await modelsLoading; } finally { modelsLoading = null; }
}

async function drawModels() {
  $('models').dataset.loaded = 'false';
  if (!window.Chart) throw new Error('Chart.js did not load (vendor/chart.umd.js): run scripts/install.sh');
  const select = $('model-select');
  const list = await api('models');
  if (!list.ok) throw new Error(`GET /ai/models: HTTP ${list.status}`);
  const chosen = select.value || (list.body[0] && list.body[0].model) || '';
  select.replaceChildren(...list.body.map((m) => el('option', { value: m.model, selected: m.model === chosen }, m.model)));
  while (charts.length) charts.pop().destroy();
  if (!chosen) {
    $('models-body').replaceChildren(el('p', { class: 'muted', text: 'no succeeded jobs yet' }));
  } else {
    const r = await api(`models/${encodeURIComponent(chosen)}/monitoring`);
    if (!r.ok) throw new Error(`GET /ai/models/${chosen}/monitoring: HTTP ${r.status} ${(r.body && r.body.error) || ''}`);
    $('models-body').replaceChildren(...r.body.versions.map((v) => versionSection(chosen, v)));
    $('models-note').textContent = r.body.alert ? 'a version drifts: see the alerts below' : '';
  }
  $('models').dataset.loaded = 'true';
}

// ---------------------------------------------------------------- views

function currentView() {
  const v = location.hash.replace('#', '');
  return ['jobs', 'review', 'models'].includes(v) ? v : 'jobs';
}

function showView() {
  const view = currentView();
  for (const s of document.querySelectorAll('[data-view-of]')) s.hidden = s.dataset.viewOf !== view;
  for (const a of document.querySelectorAll('#views a')) a.classList.toggle('current', a.dataset.view === view);
}

async function update() {
  const view = currentView();
  // Models charts are drawn on demand (opening the view, Refresh), not on every tick.
  const loaders = view === 'jobs' ? [loadJobs(), loadPipelines(), loadHealth()]
    : view === 'review' ? [loadReview()] : [];
  const results = await Promise.allSettled(loaders);
  const failed = results.filter((x) => x.status === 'rejected').map((x) => String(x.reason.message || x.reason));
  $('updated').textContent = failed.length ? `update failed: ${failed.join('; ')}` : `updated ${new Date().toLocaleTimeString()}`;
  document.body.dataset.loaded = 'true';
}

// One update at a time; a caller that arrives during one waits for it, then runs its own (after a
// retry or cancel the table must show the new state, not the answer of a request sent before).
async function refresh() {
  while (inflight) await inflight.catch(() => {});
  inflight = update();
  try { await inflight; } finally { inflight = null; }
}

function schedule() {
  clearInterval(timer);
  timer = $('auto-refresh').checked ? setInterval(refresh, REFRESH_MS) : null;
}

async function refreshModels() {
  try {
    await loadModels();
    $('updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    showMessage(String(e.message || e));
  }
}

window.addEventListener('hashchange', () => { showView(); if (currentView() === 'models') refreshModels(); else refresh(); });
$('model-select').addEventListener('change', refreshModels);
$('models-refresh').addEventListener('click', refreshModels);
$('state-filter').addEventListener('change', refresh);
$('refresh').addEventListener('click', refresh);
$('auto-refresh').addEventListener('change', schedule);
showView();
schedule();
refresh();
if (currentView() === 'models') refreshModels();
