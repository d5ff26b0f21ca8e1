// The viewer page: one upload → POST /score?preview=true → the decoded scan with its heatmaps over `heatmap_box`.
// It uses only the public API (GET /models, POST /score), so what it shows is what any client gets.

const KEY_STORAGE = "oct-api-key"; // sessionStorage only: the key is forgotten when the tab closes
// One colour per heatmap, in the order the answer lists them; the maps themselves come from the answer.
const PALETTE = [[255, 59, 48], [0, 200, 255], [255, 214, 10], [191, 90, 242], [52, 199, 89]];

const $ = (id) => document.getElementById(id);
const el = {
  model: $("model"), keyPanel: $("key-panel"), keyForm: $("key-form"), key: $("api-key"),
  drop: $("drop"), file: $("file"), status: $("status"), error: $("error"), result: $("result"),
  scan: $("scan"), overlay: $("overlay"), volume: $("volume"), frame: $("frame"), frameLabel: $("frame-label"),
  strip: $("strip"), jump: $("jump"), verdict: $("verdict"), explain: $("explain"),
  volumeSummary: $("volume-summary"), scoreLabel: $("score-label"), score: $("score"), threshold: $("threshold"),
  percentile: $("percentile"),
  toggles: $("map-toggles"), opacity: $("opacity"), opacityValue: $("opacity-value"),
};

let model = null; // GET /models, when it answered
let shown = null; // {answer, frames, frame, maps: [{name, colour, on}]}
const tinted = new Map(); // "frame/map" → canvas with the map tinted in its colour, alpha = map value
let frameToken = 0; // a newer frame or upload supersedes a draw still decoding its PNGs
let drawToken = 0;

// ---- API -----------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    const what = problem && (problem.title || problem.detail)
      ? [problem.title, problem.detail].filter(Boolean).join(": ") : `the service answered HTTP ${status}`;
    super(what);
    this.status = status;
  }
}

async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.set("X-API-Key", key);
  let response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch (e) {
    throw new ApiError(0, { title: "The service cannot be reached", detail: String(e.message || e) });
  }
  if (response.ok) return response.json();
  const problem = await response.json().catch(() => null); // problem+json, or nothing readable
  if (response.status === 401) el.keyPanel.hidden = false;
  throw new ApiError(response.status, problem);
}

async function loadModel() {
  try {
    model = await api("/models");
    el.model.textContent = `Model ${model.name} version ${model.version} on ${model.device}`;
    el.keyPanel.hidden = true;
  } catch (e) {
    el.model.textContent = `Model: ${e.message}`;
    if (e.status === 503) setTimeout(loadModel, 2000); // warming up: the page follows without a reload
  }
}

// ---- upload ----------------------------------------------------------------------------------------------------

async function scoreFile(file) {
  document.body.dataset.state = "scoring";
  showError(null);
  el.result.hidden = true; // never an old scan under a new file's name or error
  el.status.textContent = "Scoring…";
  const body = new FormData();
  body.append("file", file);
  try {
    const answer = await api("/score?preview=true", { method: "POST", body });
    await show(answer);
    el.status.textContent = "";
    document.body.dataset.state = "done";
  } catch (e) {
    el.status.textContent = "";
    showError(e.message);
    document.body.dataset.state = "error";
  }
}

function showError(message) {
  el.error.hidden = !message;
  el.error.textContent = message ? `Could not score this file. ${message}` : "";
}

// ---- result ----------------------------------------------------------------------------------------------------

async function show(answer) {
  const frames = answer.frames || [answer]; // a DICOM answer has frames; an image answer is its own one frame
  const names = [...new Set(frames.flatMap((f) => Object.keys(f.heatmaps || {})))];
  const primaryMap = model && names.includes(model.overlay_score) ? model.overlay_score : names[0];
  const before = new Map((shown ? shown.maps : []).map((m) => [m.name, m.on]));
  shown = {
    answer, frames, frame: answer.max_frame || 0,
    maps: names.map((name, i) => ({ name, colour: PALETTE[i % PALETTE.length],
                                    on: before.has(name) ? before.get(name) : name === primaryMap })),
  };
  tinted.clear();
  buildToggles();
  buildVolume();
  el.result.hidden = false;
  await showFrame(shown.frame);
}

function buildToggles() {
  el.toggles.replaceChildren(...shown.maps.map((m) => {
    const label = document.createElement("label");
    label.className = "toggle";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = m.on;
    box.name = `map-${m.name}`;
    box.dataset.map = m.name;
    box.addEventListener("change", () => { m.on = box.checked; drawOverlay(); });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.setProperty("--c", `rgb(${m.colour.join(",")})`);
    const info = model && model.scores[m.name];
    label.append(box, swatch, ` ${m.name}`);
    if (info && info.description) label.title = info.description;
    return label;
  }));
  el.toggles.parentElement.hidden = shown.maps.length === 0;
}

function buildVolume() {
  const n = shown.frames.length;
  el.volume.hidden = !shown.answer.frames || n < 2;
  el.frame.max = String(n - 1);
  // A frame the model could not read (no retina) has no score: a dashed bar, left out of the scale.
  const scores = shown.frames.filter((f) => !f.refused).map((f) => f.score);
  const lo = Math.min(...scores), hi = Math.max(...scores);
  el.strip.replaceChildren(...shown.frames.map((f, i) => {
    const bar = document.createElement("button");
    bar.type = "button";
    bar.tabIndex = -1; // the slider is the keyboard control; 100 tab stops would not be
    bar.className = f.refused ? "bar refused" : f.is_anomalous ? "bar over" : "bar";
    bar.dataset.score = f.refused ? "" : String(f.score);
    bar.style.setProperty("--h", f.refused ? "15%" : `${hi > lo ? 15 + 85 * (f.score - lo) / (hi - lo) : 60}%`);
    bar.title = f.refused ? `Frame ${i + 1}: not scored (${f.refused})` : `Frame ${i + 1}: score ${fmt(f.score)}`;
    bar.addEventListener("click", () => showFrame(i));
    return bar;
  }));
  const over = shown.frames.filter((f) => f.is_anomalous).length;
  const refused = shown.frames.filter((f) => f.refused).length;
  el.volumeSummary.hidden = !shown.answer.frames;
  el.volumeSummary.textContent = shown.answer.frames
    ? `Volume of ${n} frame${n === 1 ? "" : "s"}: ${over} above the threshold`
      + (refused ? `, ${refused} not scored (no retina found) and left out` : "")
      + `. The most anomalous is frame ${shown.answer.max_frame + 1} (score ${fmt(shown.answer.score)}).` : "";
}

async function showFrame(i) {
  shown.frame = i;
  const f = shown.frames[i], n = shown.frames.length;
  el.frame.value = String(i);
  el.frameLabel.textContent = `${i + 1} of ${n}`;
  el.frame.setAttribute("aria-valuetext", `Frame ${i + 1} of ${n}, `
                        + (f.refused ? "not scored" : `score ${fmt(f.score)}`)
                        + (f.is_anomalous ? ", above the threshold" : ""));
  [...el.strip.children].forEach((b, j) => b.classList.toggle("current", j === i));
  describe(f);
  const token = ++frameToken;
  el.overlay.dataset.busy = "1";
  const img = await loadPng(f.preview);
  if (token !== frameToken) return;
  for (const c of [el.scan, el.overlay]) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
  el.scan.getContext("2d").drawImage(img, 0, 0);
  await drawOverlay();
}

// The verdict in words: the number, what it is compared with, and what that comparison means.
function describe(f) {
  const threshold = shown.answer.threshold;
  const info = model && model.scores[model.primary_score];
  const tp = info ? info.threshold_percentile : null;
  el.scoreLabel.textContent = model ? `Score (${model.primary_score})` : "Score";
  el.threshold.textContent = fmt(threshold) + (tp == null ? "" : ` (${ordinal(tp)} percentile of normal scans)`);
  if (f.refused) { // a frame of a volume the model could not read
    el.verdict.textContent = "Not scored";
    el.verdict.className = "";
    el.explain.textContent = `The model found no retina in this frame (${f.refused.replace(/^no retina: /, "")}). `
      + "It is left out of the volume's score.";
    el.score.textContent = "–";
    el.score.dataset.value = "";
    el.percentile.textContent = "–";
    return;
  }
  const side = f.score > threshold ? "above" : f.score < threshold ? "below" : "at";
  el.verdict.textContent = f.is_anomalous ? "Outside the normal range" : "Within the normal range";
  el.verdict.className = f.is_anomalous ? "over" : "normal";
  el.explain.textContent = `The score is ${side} the threshold`
    + (tp == null ? "." : `, which is the ${ordinal(tp)} percentile of normal scans.`)
    + (f.is_anomalous ? " Review recommended." : "");
  el.score.textContent = fmt(f.score);
  el.score.dataset.value = String(f.score);
  const p = f.percentile;
  el.percentile.textContent = p >= 100 ? "Higher than every normal scan in the calibration set"
    : p <= 0 ? "Lower than every normal scan in the calibration set"
    : `Higher than ${round1(p)}% of normal scans`;
}

// ---- drawing ---------------------------------------------------------------------------------------------------

async function drawOverlay() {
  const token = ++drawToken;
  el.overlay.dataset.busy = "1";
  const f = shown.frames[shown.frame], frame = shown.frame;
  const layers = [];
  for (const m of shown.maps) {
    if (m.on && f.heatmaps && f.heatmaps[m.name]) layers.push(await tint(frame, m, f.heatmaps[m.name]));
  }
  if (token !== drawToken) return;
  const g = el.overlay.getContext("2d");
  g.clearRect(0, 0, el.overlay.width, el.overlay.height);
  const b = f.heatmap_box;
  if (b) {
    g.globalAlpha = Number(el.opacity.value) / 100;
    g.imageSmoothingEnabled = true;
    // The heatmap covers exactly the box: drawImage clips to it, so nothing lands on the white margins.
    for (const layer of layers) g.drawImage(layer, b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0);
  }
  delete el.overlay.dataset.busy;
}

async function tint(frame, m, b64) {
  const key = `${frame}/${m.name}`;
  if (tinted.has(key)) return tinted.get(key);
  const img = await loadPng(b64);
  const c = document.createElement("canvas");
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const g = c.getContext("2d", { willReadFrequently: true });
  g.drawImage(img, 0, 0);
  const data = g.getImageData(0, 0, c.width, c.height);
  const px = data.data;
  for (let i = 0; i < px.length; i += 4) { // gray value v → the map's colour with alpha v
    const v = px[i];
    px[i] = m.colour[0]; px[i + 1] = m.colour[1]; px[i + 2] = m.colour[2]; px[i + 3] = v;
  }
  g.putImageData(data, 0, 0);
  tinted.set(key, c);
  return c;
}

async function loadPng(b64) {
  const img = new Image();
  img.src = `data:image/png;base64,${b64}`;
  await img.decode();
  return img;
}

// ---- words and numbers -----------------------------------------------------------------------------------------

function fmt(x) { return Number(x).toPrecision(4); }
function round1(x) { return String(Math.round(x * 10) / 10); }
function ordinal(p) {
  const s = round1(p);
  if (!Number.isInteger(Number(s))) return `${s}th`;
  const n = Number(s), t = n % 100;
  return s + (t >= 11 && t <= 13 ? "th" : ({ 1: "st", 2: "nd", 3: "rd" })[n % 10] || "th");
}

// ---- wiring ----------------------------------------------------------------------------------------------------

el.file.addEventListener("change", () => { if (el.file.files[0]) scoreFile(el.file.files[0]); });
for (const type of ["dragenter", "dragover"]) {
  el.drop.addEventListener(type, (e) => { e.preventDefault(); el.drop.classList.add("dragging"); });
}
el.drop.addEventListener("dragleave", () => el.drop.classList.remove("dragging"));
el.drop.addEventListener("drop", (e) => {
  e.preventDefault();
  el.drop.classList.remove("dragging");
  if (e.dataTransfer.files[0]) scoreFile(e.dataTransfer.files[0]);
});
// A file dropped beside the zone must not make the browser navigate away from the page.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

el.opacity.addEventListener("input", () => {
  el.opacityValue.textContent = `${el.opacity.value}%`;
  if (shown) drawOverlay();
});
el.opacityValue.textContent = `${el.opacity.value}%`;
el.frame.addEventListener("input", () => showFrame(Number(el.frame.value)));
el.jump.addEventListener("click", () => showFrame(shown.answer.max_frame));

el.key.value = sessionStorage.getItem(KEY_STORAGE) || "";
el.keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, el.key.value.trim());
  loadModel();
});

loadModel();
