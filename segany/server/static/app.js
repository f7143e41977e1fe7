// segany annotation page: plain JS, no build step. Talks to the JSON API under /api.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d", { willReadFrequently: true });
const PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [245, 130, 48], [145, 30, 180], [70, 240, 240],
  [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40], [128, 0, 0], [0, 0, 128]];
const CURRENT_COLOR = [30, 144, 255];
const PROPOSAL_COLOR = [255, 140, 0];

const S = {
  images: [], imageId: null, info: null, img: null, ready: false,
  prompt: { points: [], labels: [], box: null }, undo: [], redo: [],
  prediction: null, selected: 0, seq: 0,
  objects: [], selectedObject: -1, showObjects: true, snapEdges: false, nextId: 1,
  proposals: [], dirty: false, saveTimer: null, drag: null,
};
window.segany = S; // for tests and the console

// ---------------------------------------------------------------- API
async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body instanceof FormData) opts.body = body;
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const err = new Error((data && data.detail) || `${r.status} ${r.statusText}`);
    err.status = r.status;
    throw err;
  }
  return data;
}
const enc = (id) => id.split("/").map(encodeURIComponent).join("/");

function status(msg, isError) { const el = $("status"); el.textContent = msg; el.style.color = isError ? "#c00" : ""; }

// ---------------------------------------------------------------- RLE (COCO compressed, column-major)
function rleDecode(rle) {
  const [h, w] = rle.size, s = rle.counts, counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x += (c & 0x1f) * Math.pow(32, k);
      more = c & 0x20; p++; k++;
      if (!more && (c & 0x10)) x -= Math.pow(32, k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  const m = new Uint8Array(h * w);
  let i = 0, v = 0;
  for (const c of counts) { if (v) m.fill(1, i, i + c); i += c; v ^= 1; }
  return { h, w, data: m }; // data[x * h + y]
}

// An offscreen canvas with the mask painted in colour (alpha), cached on the object.
function maskLayer(obj, color, alpha) {
  const key = color.join(",") + ":" + alpha;
  if (obj._layer && obj._layerKey === key) return obj._layer;
  const m = obj._mask || (obj._mask = rleDecode(obj.segmentation));
  const c = document.createElement("canvas");
  c.width = m.w; c.height = m.h;
  const cx = c.getContext("2d");
  const im = cx.createImageData(m.w, m.h);
  const px = new Uint32Array(im.data.buffer);
  const col = ((Math.round(alpha * 255) << 24) | (color[2] << 16) | (color[1] << 8) | color[0]) >>> 0;
  const d = m.data, h = m.h, w = m.w;
  for (let x = 0; x < w; x++) {
    const base = x * h;
    for (let y = 0; y < h; y++) if (d[base + y]) px[y * w + x] = col;
  }
  cx.putImageData(im, 0, 0);
  obj._layer = c; obj._layerKey = key;
  return c;
}

// ---------------------------------------------------------------- drawing
function draw() {
  if (!S.img) return;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(S.img, 0, 0);
  if (S.showObjects) {
    S.objects.forEach((o, i) => {
      if (o.hidden) return;
      const col = PALETTE[i % PALETTE.length];
      ctx.drawImage(maskLayer(o, col, i === S.selectedObject ? 0.7 : 0.45), 0, 0);
    });
  }
  S.proposals.forEach((p) => ctx.drawImage(maskLayer(p, PROPOSAL_COLOR, 0.35), 0, 0));
  const cur = currentMask();
  if (cur) ctx.drawImage(maskLayer(cur, CURRENT_COLOR, 0.5), 0, 0);
  const r = Math.max(3, Math.round(Math.max(canvas.width, canvas.height) / 150));
  const pr = S.prompt;
  pr.points.forEach(([x, y], i) => {
    ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.fillStyle = pr.labels[i] ? "#22cc44" : "#ee2222"; ctx.fill();
    ctx.lineWidth = Math.max(1, r / 3); ctx.strokeStyle = "#fff"; ctx.stroke();
  });
  const box = S.drag && S.drag.box ? S.drag.box : pr.box;
  if (box) {
    ctx.lineWidth = Math.max(1, r / 2); ctx.strokeStyle = "#ffd700";
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  }
}

// Scale the canvas (CSS size) to fill the stage, up or down; its pixels stay the image's.
function fit() {
  if (!S.info) return;
  const wrap = $("canvas-wrap");
  const W = wrap.clientWidth - 8;
  const H = window.innerHeight - wrap.getBoundingClientRect().top - 40;
  const s = Math.max(0.05, Math.min(W / canvas.width, H / canvas.height));
  canvas.style.width = Math.floor(canvas.width * s) + "px";
  canvas.style.height = Math.floor(canvas.height * s) + "px";
}
window.addEventListener("resize", fit);

function currentMask() { return S.prediction ? S.prediction.masks[S.selected] : null; }

// ---------------------------------------------------------------- image list / navigation
async function loadImages() {
  const data = await api("GET", "/api/images");
  S.images = data.images;
  renderImageList();
}

function renderImageList() {
  const ul = $("image-list");
  ul.innerHTML = "";
  for (const im of S.images) {
    const li = document.createElement("li");
    li.textContent = im.id;
    li.title = `${im.width}×${im.height}`;
    if (im.annotated) li.classList.add("annotated");
    if (im.id === S.imageId) li.classList.add("current");
    li.onclick = () => openImage(im.id);
    ul.appendChild(li);
  }
}

async function openImage(id) {
  if (S.dirty) await save();
  S.imageId = id; S.ready = false; S.info = null;
  S.prompt = { points: [], labels: [], box: null }; S.undo = []; S.redo = [];
  S.prediction = null; S.objects = []; S.proposals = []; S.selectedObject = -1;
  history.replaceState(null, "", "#image=" + encodeURIComponent(id));
  $("image-name").textContent = id;
  renderImageList(); renderCandidates(); renderObjects(); renderProposals();
  try {
    const info = await api("GET", "/api/image/" + enc(id));
    if (S.imageId !== id) return;
    S.info = info;
    $("prev").disabled = !info.previous; $("next").disabled = !info.next;
    const img = new Image();
    img.src = "/api/file/" + enc(id);
    await img.decode();
    if (S.imageId !== id) return;
    S.img = img; canvas.width = info.width; canvas.height = info.height; fit();
    const ann = await api("GET", "/api/annotations/" + enc(id));
    if (S.imageId !== id) return;
    S.objects = ann.annotations || [];
    S.nextId = S.objects.reduce((m, o) => Math.max(m, (o.id || 0) + 1), 1);
    S.dirty = false; $("save-state").textContent = "saved";
    renderObjects(); draw();
    await embed(id);
  } catch (e) {
    status(`cannot open ${id}: ${e.message}`, true);
  }
}

async function embed(id) {
  const prog = $("progress");
  let st = await api("POST", "/api/embed/" + enc(id));
  prog.hidden = st.state === "ready";
  const t0 = performance.now();
  while (st.state !== "ready") {
    if (S.imageId !== id) return;
    if (st.state === "error") { prog.hidden = true; status("embedding failed: " + st.error, true); return; }
    const frac = st.progress != null ? st.progress : Math.min(0.9, (performance.now() - t0) / 4000);
    $("progress-bar").style.width = Math.round(frac * 100) + "%";
    $("progress-text").textContent = `Computing image embedding… ${st.state}` + (st.elapsed_s != null ? ` ${st.elapsed_s.toFixed(1)} s` : "");
    await new Promise((r) => setTimeout(r, 150));
    st = await api("GET", "/api/status/" + enc(id));
  }
  if (S.imageId !== id) return;
  $("progress-bar").style.width = "100%";
  prog.hidden = true;
  S.ready = true;
  status(`ready (${S.info.width}×${S.info.height}). Left click: object · right click / Alt+click: background · drag: box · ? for help`);
  if (S.prompt.points.length || S.prompt.box) predict();
}

function go(delta) {
  if (!S.info) return;
  const id = delta > 0 ? S.info.next : S.info.previous;
  if (id) openImage(id);
}

// ---------------------------------------------------------------- prompts
function snapshot() { return JSON.parse(JSON.stringify(S.prompt)); }
function pushPrompt(mutate) {
  S.undo.push(snapshot()); S.redo = [];
  mutate(S.prompt);
  predict(true);
}
function undo() { if (!S.undo.length) return; S.redo.push(snapshot()); S.prompt = S.undo.pop(); predict(false); }
function redo() { if (!S.redo.length) return; S.undo.push(snapshot()); S.prompt = S.redo.pop(); predict(false); }
function clearPrompt() {
  if (!S.prompt.points.length && !S.prompt.box) return;
  S.undo.push(snapshot()); S.redo = [];
  S.prompt = { points: [], labels: [], box: null };
  S.prediction = null; renderCandidates(); draw();
}

async function predict(refine) {
  const pr = S.prompt;
  if (!pr.points.length && !pr.box) { S.prediction = null; renderCandidates(); draw(); return; }
  draw();
  if (!S.ready) { status("waiting for the embedding…"); return; }
  const seq = ++S.seq, id = S.imageId;
  const single = pr.points.length === 1 && !pr.box;
  const body = { points: pr.points, labels: pr.labels, box: pr.box, multimask: single, snap_edges: S.snapEdges };
  const prev = currentMask();
  if (refine && prev && !single && prev.logits_id) body.mask_input_id = prev.logits_id;
  const t0 = performance.now();
  let res;
  try {
    res = await api("POST", "/api/predict/" + enc(id), body);
  } catch (e) {
    if (body.mask_input_id && /mask_input_id/.test(e.message)) { delete body.mask_input_id; try { res = await api("POST", "/api/predict/" + enc(id), body); } catch (e2) { e = e2; } }
    if (!res) { if (seq === S.seq) status(e.message, true); return; }
  }
  if (seq !== S.seq || id !== S.imageId) return; // a newer click superseded this one
  S.prediction = res; S.selected = res.best;
  renderCandidates(); draw();
  status(`mask in ${Math.round(performance.now() - t0)} ms (server ${res.elapsed_ms} ms) — Enter to accept`);
}

function selectCandidate(i) {
  if (!S.prediction || i < 0 || i >= S.prediction.masks.length) return;
  S.selected = i; renderCandidates(); draw();
}

function renderCandidates() {
  const el = $("candidates");
  el.innerHTML = "";
  if (!S.prediction) { el.textContent = "click on the image"; el.className = "muted"; return; }
  el.className = "";
  S.prediction.masks.forEach((m, i) => {
    const b = document.createElement("button");
    b.textContent = `${i + 1}: score ${m.score.toFixed(3)} · ${m.area} px`;
    if (i === S.selected) b.classList.add("on");
    b.onclick = () => selectCandidate(i);
    el.appendChild(b);
  });
}

// ---------------------------------------------------------------- objects
function accept() {
  const m = currentMask();
  if (!m) { status("nothing to accept: click on an object first"); return; }
  const pr = S.prompt;
  S.objects.push({
    id: S.nextId++, segmentation: m.segmentation, area: m.area, bbox: m.bbox,
    predicted_iou: m.score, point_coords: pr.points.filter((_, i) => pr.labels[i] === 1),
    stability_score: 1.0, crop_box: [0, 0, S.info.width, S.info.height], label: $("label").value.trim(),
  });
  S.prompt = { points: [], labels: [], box: null }; S.undo = []; S.redo = []; S.prediction = null;
  S.selectedObject = S.objects.length - 1;
  markDirty(); renderCandidates(); renderObjects(); draw();
  status(`object ${S.objects.length} accepted`);
}

function deleteObject(i) {
  if (i < 0 || i >= S.objects.length) return;
  S.objects.splice(i, 1);
  S.objects.forEach((o) => { o._layer = null; }); // colours follow the index
  S.selectedObject = -1;
  markDirty(); renderObjects(); draw();
}

function renderObjects() {
  const ul = $("objects");
  ul.innerHTML = "";
  $("object-count").textContent = S.objects.length ? `(${S.objects.length})` : "";
  S.objects.forEach((o, i) => {
    const li = document.createElement("li");
    if (i === S.selectedObject) li.classList.add("selected");
    const sw = document.createElement("span");
    sw.className = "swatch"; const c = PALETTE[i % PALETTE.length]; sw.style.background = `rgb(${c})`;
    const name = document.createElement("span");
    name.className = "name"; name.textContent = `#${o.id} ${o.label || ""} (${o.area} px)`;
    const eye = document.createElement("button");
    eye.textContent = o.hidden ? "show" : "hide"; eye.title = "hide / show this object";
    eye.onclick = (e) => { e.stopPropagation(); o.hidden = !o.hidden; renderObjects(); draw(); };
    const del = document.createElement("button");
    del.textContent = "✕"; del.title = "delete (Del)";
    del.onclick = (e) => { e.stopPropagation(); deleteObject(i); };
    li.append(sw, name, eye, del);
    li.onclick = () => { S.selectedObject = S.selectedObject === i ? -1 : i; renderObjects(); draw(); };
    ul.appendChild(li);
  });
}

// ---------------------------------------------------------------- proposals (semi-automatic)
async function propose() {
  if (!S.ready) { status("wait for the embedding"); return; }
  const id = S.imageId;
  status("proposing masks…");
  $("propose").disabled = true;
  try {
    const res = await api("POST", "/api/proposals/" + enc(id), {});
    if (id !== S.imageId) return;
    S.proposals = res.proposals;
    status(`${res.proposals.length} proposals in ${Math.round(res.elapsed_ms)} ms: ✓ to accept, ✕ to reject, then click in what is missing`);
  } catch (e) {
    status("proposals failed: " + e.message, true);
  } finally {
    $("propose").disabled = false;
  }
  renderProposals(); draw();
}

function acceptProposal(i) {
  const p = S.proposals[i];
  S.objects.push({
    id: S.nextId++, segmentation: p.segmentation, area: p.area, bbox: p.bbox, predicted_iou: p.predicted_iou,
    point_coords: p.point_coords, stability_score: p.stability_score, crop_box: p.crop_box, label: $("label").value.trim(),
  });
  S.proposals.splice(i, 1);
  markDirty(); renderObjects(); renderProposals(); draw();
}
function rejectProposal(i) { S.proposals.splice(i, 1); renderProposals(); draw(); }

function renderProposals() {
  const ul = $("proposals");
  ul.innerHTML = "";
  $("proposal-count").textContent = S.proposals.length ? `(${S.proposals.length})` : "";
  $("proposal-actions").hidden = !S.proposals.length;
  S.proposals.forEach((p, i) => {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = "swatch"; sw.style.background = `rgb(${PROPOSAL_COLOR})`;
    const name = document.createElement("span");
    name.className = "name"; name.textContent = `iou ${p.predicted_iou.toFixed(2)} · ${p.area} px`;
    const ok = document.createElement("button"); ok.textContent = "✓"; ok.title = "accept"; ok.onclick = () => acceptProposal(i);
    const no = document.createElement("button"); no.textContent = "✕"; no.title = "reject"; no.onclick = () => rejectProposal(i);
    li.append(sw, name, ok, no);
    li.onmouseenter = () => { S.hoverProposal = i; };
    ul.appendChild(li);
  });
}

// ---------------------------------------------------------------- saving
function markDirty() {
  S.dirty = true; $("save-state").textContent = "unsaved";
  clearTimeout(S.saveTimer);
  S.saveTimer = setTimeout(save, 1500); // autosave
}

async function save() {
  clearTimeout(S.saveTimer);
  if (!S.imageId || !S.info) return;
  const id = S.imageId;
  const annotations = S.objects.map((o) => ({
    id: o.id, segmentation: o.segmentation, predicted_iou: o.predicted_iou, point_coords: o.point_coords,
    stability_score: o.stability_score, crop_box: o.crop_box, label: o.label || "",
  }));
  $("save-state").textContent = "saving…";
  try {
    await api("PUT", "/api/annotations/" + enc(id), { annotations });
    if (id === S.imageId) { S.dirty = false; $("save-state").textContent = "saved"; }
    const im = S.images.find((x) => x.id === id);
    if (im && !im.annotated) { im.annotated = true; renderImageList(); }
  } catch (e) {
    $("save-state").textContent = "save failed";
    status("save failed: " + e.message, true);
  }
}

// ---------------------------------------------------------------- mouse
function imageXY(e) {
  const r = canvas.getBoundingClientRect();
  const x = ((e.clientX - r.left) / r.width) * canvas.width;
  const y = ((e.clientY - r.top) / r.height) * canvas.height;
  return [Math.min(canvas.width, Math.max(0, x)), Math.min(canvas.height, Math.max(0, y))];
}

canvas.addEventListener("contextmenu", (e) => e.preventDefault());
canvas.addEventListener("mousedown", (e) => {
  if (!S.img) return;
  e.preventDefault();
  S.drag = { start: imageXY(e), button: e.button, alt: e.altKey, box: null, startPx: [e.clientX, e.clientY] };
});
window.addEventListener("mousemove", (e) => {
  if (!S.drag || S.drag.button !== 0) return;
  const [sx, sy] = S.drag.startPx;
  if (Math.hypot(e.clientX - sx, e.clientY - sy) < 5 && !S.drag.box) return;
  const [x0, y0] = S.drag.start, [x1, y1] = imageXY(e);
  S.drag.box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
  draw();
});
window.addEventListener("mouseup", (e) => {
  const d = S.drag;
  if (!d) return;
  S.drag = null;
  if (d.box) {
    const box = d.box.map((v) => Math.round(v * 10) / 10);
    pushPrompt((p) => { p.box = box; });
    return;
  }
  if (e.target !== canvas) { draw(); return; }
  const [x, y] = d.start.map((v) => Math.round(v * 10) / 10);
  const label = d.button === 2 || d.alt ? 0 : 1;
  if (d.button !== 0 && d.button !== 2) return;
  pushPrompt((p) => { p.points.push([x, y]); p.labels.push(label); });
});

// ---------------------------------------------------------------- keyboard
window.addEventListener("keydown", (e) => {
  const typing = e.target.tagName === "INPUT";
  const k = e.key, ctrl = e.ctrlKey || e.metaKey;
  if (typing) {
    if (k === "Enter") { e.preventDefault(); e.target.blur(); accept(); }
    else if (k === "Escape") e.target.blur();
    return;
  }
  if (!$("help").hidden && (k === "Escape" || k === "?")) { $("help").hidden = true; return; }
  let handled = true;
  if (ctrl && (k === "z" || k === "Z")) e.shiftKey ? redo() : undo();
  else if (ctrl && (k === "y" || k === "Y")) redo();
  else if (ctrl && (k === "s" || k === "S")) save();
  else if (ctrl) handled = false;
  else if (k === "z") undo();
  else if (k === "y") redo();
  else if (k === "Escape" || k === "c") clearPrompt();
  else if (k === "Enter" || k === "a") accept();
  else if (k === "1" || k === "2" || k === "3") selectCandidate(Number(k) - 1);
  else if (k === "Tab") { if (S.prediction) selectCandidate((S.selected + 1) % S.prediction.masks.length); }
  else if (k === "Delete" || k === "Backspace") deleteObject(S.selectedObject);
  else if (k === "h") toggleObjects();
  else if (k === "e") toggleSnap();
  else if (k === "p") propose();
  else if (k === "s") save();
  else if (k === "ArrowRight" || k === ".") go(1);
  else if (k === "ArrowLeft" || k === ",") go(-1);
  else if (k === "l") $("label").focus();
  else if (k === "?") $("help").hidden = !$("help").hidden;
  else handled = false;
  if (handled) e.preventDefault();
});

function toggleSnap() {
  S.snapEdges = !S.snapEdges;
  $("snap").textContent = S.snapEdges ? "Snap edges: on" : "Snap edges: off";
  $("snap").setAttribute("aria-pressed", String(S.snapEdges));
  predict(false); // the current prompt again, with or without snapping
}

function toggleObjects() {
  S.showObjects = !S.showObjects;
  $("toggle-objects").textContent = S.showObjects ? "Hide objects" : "Show objects";
  draw();
}

// ---------------------------------------------------------------- buttons
$("prev").onclick = () => go(-1);
$("next").onclick = () => go(1);
$("undo").onclick = undo;
$("redo").onclick = redo;
$("clear").onclick = clearPrompt;
$("accept").onclick = accept;
$("propose").onclick = propose;
$("toggle-objects").onclick = toggleObjects;
$("snap").onclick = toggleSnap;
$("save").onclick = save;
$("help-btn").onclick = () => { $("help").hidden = false; };
$("help-close").onclick = () => { $("help").hidden = true; };
$("accept-all").onclick = () => { while (S.proposals.length) acceptProposal(0); };
$("reject-all").onclick = () => { S.proposals = []; renderProposals(); draw(); };
$("upload").onchange = async (e) => {
  const f = e.target.files[0];
  if (!f) return;
  const fd = new FormData();
  fd.append("file", f);
  status("uploading…");
  try {
    const rec = await api("POST", "/api/images", fd);
    await loadImages();
    openImage(rec.id);
  } catch (err) {
    status("upload failed: " + err.message, true);
  }
  e.target.value = "";
};
window.addEventListener("beforeunload", (e) => { if (S.dirty) { save(); e.preventDefault(); } });

// ---------------------------------------------------------------- start
(async () => {
  try {
    await loadImages();
  } catch (e) {
    status("cannot list images: " + e.message, true);
    return;
  }
  const m = location.hash.match(/^#image=(.+)$/);
  const want = m ? decodeURIComponent(m[1]) : null;
  if (want && S.images.some((i) => i.id === want)) openImage(want);
  else if (S.images.length) openImage(S.images[0].id);
})();
