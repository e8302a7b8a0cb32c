// The live retrieval page: draw with a mouse or pen; after every stroke all strokes so far go to
// POST /api/query, and the answer (top 10, glimpses, the target's rank after each stroke, the
// calibrated confidence and whether the person can stop drawing) is shown.
// `window.darpLive` is the page's state, for the browser console and the browser test.
"use strict";

const GALLERY_SHOWN = 120; // photos offered as targets below the results
const REPLAY_STROKE_MS = 700;
const PATCH_COLOURS = ["#e62828", "#f08c14", "#1e6ee6", "#8c3cc8", "#14a05a"];

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ink = canvas.getContext("2d");
const overlay = $("overlay").getContext("2d");

const live = {
  strokes: [],        // finished strokes, each a list of [x, y] canvas pixels
  current: null,      // the stroke being drawn
  target: null,       // photo id or null
  photoIds: [],
  sketches: [],
  sent: 0,            // requests sent
  shown: 0,           // number of the request whose answer is on screen
  pending: 0,         // requests in flight
  last: null,         // the answer on screen
  replayTimer: null,
};
window.darpLive = live;

function setPending(delta) {
  live.pending += delta;
  document.body.dataset.pending = String(live.pending);
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// ---- drawing ----------------------------------------------------------------------------------

function canvasPoint(event) {
  const rect = canvas.getBoundingClientRect();
  const x = (event.clientX - rect.left) * canvas.width / rect.width;
  const y = (event.clientY - rect.top) * canvas.height / rect.height;
  return [Math.min(Math.max(x, 0), canvas.width), Math.min(Math.max(y, 0), canvas.height)];
}

function inkStyle() {
  ink.lineWidth = 3;
  ink.lineCap = "round";
  ink.lineJoin = "round";
  ink.strokeStyle = "#111";
  ink.fillStyle = "#111";
}

function drawSegment(a, b) {
  ink.beginPath();
  ink.moveTo(a[0], a[1]);
  ink.lineTo(b[0], b[1]);
  ink.stroke();
}

function drawDot(p) {
  ink.beginPath();
  ink.arc(p[0], p[1], 1.5, 0, 2 * Math.PI);
  ink.fill();
}

function drawStroke(points) {
  drawDot(points[0]);
  for (let i = 1; i < points.length; i++) drawSegment(points[i - 1], points[i]);
}

canvas.addEventListener("pointerdown", (event) => {
  if (live.replayTimer !== null || event.button !== 0) return;
  canvas.setPointerCapture(event.pointerId);
  const p = canvasPoint(event);
  live.current = [p];
  drawDot(p);
});

canvas.addEventListener("pointermove", (event) => {
  if (live.current === null) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of (events.length ? events : [event])) {
    const p = canvasPoint(e);
    const last = live.current[live.current.length - 1];
    if (p[0] === last[0] && p[1] === last[1]) continue;
    drawSegment(last, p);
    live.current.push(p);
  }
});

function endStroke() {
  if (live.current === null) return;
  live.strokes.push(live.current);
  live.current = null;
  sendQuery();
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

function clearDrawing() {
  stopReplay();
  live.strokes = [];
  live.current = null;
  live.shown = live.sent; // answers still in flight are for the old drawing
  live.last = null;
  ink.clearRect(0, 0, canvas.width, canvas.height);
  overlay.clearRect(0, 0, canvas.width, canvas.height);
  $("stroke-count").textContent = "0";
  $("level").textContent = "\u2013";
  $("target-rank").textContent = "\u2013";
  $("latency").textContent = "";
  $("top10").replaceChildren();
  showConfidence(null);
  drawPlot([]);
  showError("");
}

// ---- talking to the server --------------------------------------------------------------------

async function postJSON(url, body) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || response.statusText);
  return answer;
}

async function sendQuery() {
  if (live.strokes.length === 0) return;
  const number = ++live.sent;
  setPending(+1);
  try {
    const sent = performance.now();
    const answer = await postJSON("/api/query", {
      strokes: live.strokes,
      canvas: [canvas.width, canvas.height],
      target: live.target,
    });
    answer.end_to_end_ms = performance.now() - sent; // what the person waited: network, queueing and all
    if (number > live.shown) {
      live.shown = number;
      live.last = answer;
      showAnswer(answer);
      showError("");
    }
  } catch (error) {
    showError("query failed: " + error.message);
  } finally {
    setPending(-1);
  }
}

// ---- showing an answer ------------------------------------------------------------------------

function photoImage(id, size) {
  const img = document.createElement("img");
  img.src = "/photos/" + encodeURIComponent(id);
  img.alt = id;
  img.title = id;
  img.width = size;
  img.height = size;
  return img;
}

function showAnswer(answer) {
  $("stroke-count").textContent = String(answer.n_strokes);
  $("level").textContent = answer.level + 1 + "/17";
  $("target-rank").textContent = answer.target_rank === null ? "\u2013" : String(answer.target_rank);
  $("gallery-size").textContent = "of " + answer.gallery_size;
  $("latency").textContent =
    Math.round(answer.end_to_end_ms) + " ms end to end (" + answer.latency_ms.toFixed(1) + " ms in the server)";
  const list = $("top10");
  list.replaceChildren();
  for (const entry of answer.top10) {
    const item = document.createElement("li");
    if (entry.photo_id === live.target) item.className = "hit";
    item.append(photoImage(entry.photo_id, 96), "#" + entry.rank + " \u00b7 d " + entry.distance.toFixed(2));
    list.append(item);
  }
  drawGlimpses(answer.glimpses, answer.glimpse_sides);
  showConfidence(answer);
  drawPlot(answer.target_ranks || [], answer.confidences || [], answer.stop_stroke, answer.stop_at);
}

// The calibrated confidence in plain words: how sure the server is that its first photo is the one
// being drawn (and that it is among the top 5), and whether the person can stop drawing.
function confidenceText(answer) {
  if (answer === null) return "";
  if (answer.confidence === null) return "no confidence for this run (fit one with darp calibrate)";
  const top1 = Math.round(100 * answer.confidence.top1), top5 = Math.round(100 * answer.confidence.top5);
  const now = answer.confidence.top1 >= answer.stop_at;
  let text = now ? top1 + "% sure: you can stop"
    : answer.confidence.top5 >= answer.stop_at
      ? top1 + "% sure of the first photo, " + top5 + "% that it is in the top 5: you could stop and pick it there"
      : top1 + "% sure of the first photo (" + top5 + "% that it is in the top 5): keep drawing";
  if (answer.stop_stroke !== null && !(now && answer.stop_stroke === answer.n_strokes)) {
    text += " \u00b7 could stop at stroke " + answer.stop_stroke;
  }
  return text;
}

function showConfidence(answer) {
  const box = $("confidence");
  const text = confidenceText(answer);
  box.textContent = text || "\u00a0";
  box.dataset.state = answer === null || answer.confidence === null ? "none"
    : answer.confidence.top1 >= answer.stop_at ? "stop" : answer.confidence.top5 >= answer.stop_at ? "pick" : "draw";
  box.dataset.top1 = answer && answer.confidence ? String(answer.confidence.top1) : "";
  box.dataset.stopStroke = answer && answer.stop_stroke !== null ? String(answer.stop_stroke) : "";
}

function drawGlimpses(centres, sides) {
  overlay.clearRect(0, 0, canvas.width, canvas.height);
  overlay.lineWidth = 1.5;
  centres.forEach(([x, y], i) => {
    const alpha = 0.35 + 0.65 * (i + 1) / centres.length; // later glimpses stronger
    sides.forEach((side, k) => {
      overlay.strokeStyle = PATCH_COLOURS[k % PATCH_COLOURS.length];
      overlay.globalAlpha = k === 0 ? alpha : alpha * 0.35;
      overlay.strokeRect(x - side / 2, y - side / 2, side, side);
    });
    overlay.globalAlpha = 1;
    overlay.fillStyle = PATCH_COLOURS[0];
    overlay.fillText(String(i + 1), x + 2, y - 2);
  });
}

// The target's rank after each stroke, on a log scale (rank 1 at the top), the confidence (dashed,
// 0-100% on the right axis) and the stroke where it first said "you can stop".
function drawPlot(ranks, confidences = [], stopStroke = null, stopAt = null) {
  const svg = $("plot");
  const ns = "http://www.w3.org/2000/svg";
  const W = 512, H = 170, left = 44, right = 34, top = 12, bottom = 30;
  const n = live.last ? live.last.gallery_size : 1;
  const strokes = Math.max(5, ranks.length, confidences.length);
  const x = (i) => left + (W - left - right) * (strokes === 1 ? 0 : i / (strokes - 1));
  const y = (r) => top + (H - top - bottom) * (n > 1 ? Math.log(r) / Math.log(n) : 0);
  const el = (name, attrs, text) => {
    const node = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  svg.replaceChildren();
  const ticks = [1];
  for (let t = 10; t < n; t *= 10) ticks.push(t);
  if (n > 1) ticks.push(n);
  for (const t of ticks) {
    el("line", { x1: left, x2: W - right, y1: y(t), y2: y(t), class: "grid" });
    el("text", { x: left - 6, y: y(t) + 4, "text-anchor": "end" }, String(t));
  }
  el("line", { x1: left, x2: left, y1: top, y2: H - bottom, class: "axis" });
  el("line", { x1: left, x2: W - right, y1: H - bottom, y2: H - bottom, class: "axis" });
  for (let i = 0; i < strokes; i++) {
    el("text", { x: x(i), y: H - bottom + 14, "text-anchor": "middle" }, String(i + 1));
  }
  el("text", { x: (W + left) / 2, y: H - 2, "text-anchor": "middle" }, "stroke");
  el("text", { x: 10, y: top + (H - top - bottom) / 2, transform: `rotate(-90 10 ${top + (H - top - bottom) / 2})`,
               "text-anchor": "middle" }, "target rank");
  if (confidences.length) {
    const yc = (p) => top + (H - top - bottom) * (1 - p);
    for (const p of [0, 0.5, 1]) el("text", { x: W - right + 4, y: yc(p) + 4, class: "confidence-axis" }, Math.round(100 * p) + "%");
    if (stopAt !== null) el("line", { x1: left, x2: W - right, y1: yc(stopAt), y2: yc(stopAt), class: "threshold" });
    el("polyline", { points: confidences.map((p, i) => `${x(i)},${yc(p)}`).join(" "), class: "confidence",
                     "data-confidences": confidences.join(",") });
    if (stopStroke !== null) {
      el("line", { x1: x(stopStroke - 1), x2: x(stopStroke - 1), y1: top, y2: H - bottom, class: "stop",
                   "data-stroke": stopStroke });
      el("text", { x: x(stopStroke - 1) + 3, y: top + 10, class: "stop-label" }, "stop");
    }
  }
  if (ranks.length === 0) {
    el("text", { x: (W + left) / 2, y: H / 2 - 10, "text-anchor": "middle" },
       live.target === null ? "pick a target photo to follow its rank" : "draw to see the target's rank");
    return;
  }
  el("polyline", { points: ranks.map((r, i) => `${x(i)},${y(r)}`).join(" ") });
  ranks.forEach((r, i) => el("circle", { cx: x(i), cy: y(r), r: 3.5, "data-rank": r }));
}

// ---- target, gallery and replay ----------------------------------------------------------------

function setTarget(id) {
  live.target = id;
  const img = $("target-img");
  img.hidden = id === null;
  if (id !== null) img.src = "/photos/" + encodeURIComponent(id);
  $("target-caption").textContent = id === null ? "none" : id;
  for (const thumb of $("gallery").children) thumb.classList.toggle("chosen", thumb.alt === id);
  if (live.strokes.length) sendQuery();
  else drawPlot([]);
}

function stopReplay() {
  if (live.replayTimer !== null) clearInterval(live.replayTimer);
  live.replayTimer = null;
  $("replay").textContent = "replay";
}

async function replay() {
  if (live.replayTimer !== null) {
    stopReplay();
    return;
  }
  const sketchId = $("sketch-select").value;
  let sketch;
  try {
    sketch = await postJSON("/api/replay", { sketch_id: sketchId });
  } catch (error) {
    showError("replay failed: " + error.message);
    return;
  }
  clearDrawing();
  setTarget(sketch.photo_id);
  const side = Math.max(canvas.width, canvas.height);
  const dx = (side - canvas.width) / 2, dy = (side - canvas.height) / 2;
  const strokes = sketch.strokes.map((s) => s.map(([x, y]) => [x * side - dx, y * side - dy]));
  let next = 0;
  $("status").textContent = "replaying " + sketch.sketch_id + " (" + strokes.length + " strokes)";
  $("replay").textContent = "stop";
  const step = () => {
    inkStyle();
    drawStroke(strokes[next]);
    live.strokes.push(strokes[next]);
    next += 1;
    sendQuery();
    if (next === strokes.length) stopReplay();
  };
  live.replayTimer = setInterval(step, REPLAY_STROKE_MS);
  step();
}

async function start() {
  inkStyle();
  document.body.dataset.pending = "0";
  drawPlot([]);
  $("clear").addEventListener("click", clearDrawing);
  $("replay").addEventListener("click", replay);
  $("find").addEventListener("click", () => {
    clearDrawing();
    setTarget(live.photoIds[Math.floor(Math.random() * live.photoIds.length)]);
    $("status").textContent = "Find this one: draw the target photo and watch its rank.";
  });
  showConfidence(null);
  const response = await fetch("/api/gallery");
  const info = await response.json();
  live.photoIds = info.photo_ids;
  live.sketches = info.sketches;
  const gallery = $("gallery");
  for (const id of info.photo_ids.slice(0, GALLERY_SHOWN)) {
    const img = photoImage(id, 48);
    img.addEventListener("click", () => setTarget(id));
    gallery.append(img);
  }
  const select = $("sketch-select");
  for (const s of info.sketches) {
    const option = document.createElement("option");
    option.value = s.sketch_id;
    option.textContent = s.sketch_id + " (" + s.n_strokes + " strokes)";
    select.append(option);
  }
  document.body.dataset.ready = "1";
}

start().catch((error) => showError("could not load the gallery: " + error.message));
