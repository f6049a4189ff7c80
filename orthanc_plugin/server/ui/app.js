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

async function update() {
  const results = await Promise.allSettled([loadJobs(), loadPipelines(), loadHealth()]);
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

$('state-filter').addEventListener('change', refresh);
$('refresh').addEventListener('click', refresh);
$('auto-refresh').addEventListener('change', schedule);
schedule();
refresh();
