// The latent-space page of `vae serve`: a worked example of the server's Open Inference
// Protocol API. It reads the model's metadata (GET /v2/models/vae-decoder: the latent size,
// and the dimensions' order and spread as the export stage recorded them) and decodes every
// picture with POST /v2/models/vae-decoder/infer. A drawing goes to vae-encoder and vae-score
// the same way, when the server has them.
"use strict";

const MODEL = "vae-decoder";
const SIDE = 28;
const STRIP_STEPS = 10;
const page = {
  input: "z", dim: 0, z: null,
  inFlight: false, again: false,  // one slider request at a time; the newest z goes next
  latencies: [],  // ms from a slider request to its painted image (read by the tests)
  drawn: [],  // ms from the same request to the image drawn into the canvas, before its frame
  drawing: null,  // the last drawing sent, 784 grey levels; then its score (read by the tests)
  score: null, encoded: 0,
};
window.latentPage = page;

async function call(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  const answer = await response.json();
  if (!response.ok) throw new Error(`${path}: ${answer.error || response.status}`);
  return answer;
}

// One input's rows through a model's infer endpoint -> its outputs by name, flat.
async function infer(model, input, rows, parameters = {}) {
  const answer = await call(`/v2/models/${model}/infer`, {
    inputs: [{ name: input, datatype: "FP32", shape: [rows.length, rows[0].length], data: rows.flat() }],
    parameters,
  });
  return Object.fromEntries(answer.outputs.map((output) => [output.name, output.data]));
}

// rows of z (arrays of page.dim numbers) -> their images, flat: 784 probabilities each.
async function decode(rows) {
  return Object.values(await infer(MODEL, page.input, rows))[0];
}

// The prior, reproducibly from a seed: mulberry32 uniforms, Box-Muller normals. (The page's
// own generator: seed 7 here is not seed 7 of /v1/samples.png, which draws with numpy.)
function priorSample(seed) {
  let state = seed >>> 0;
  const uniform = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) + 1) / 4294967297;  // in (0, 1): the log below is finite
  };
  return Array.from({ length: page.dim }, () =>
    Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform()));
}

// Paint image number `index` of `pixels` at column `column` of the canvas, scaled up.
function paint(canvas, pixels, index = 0, column = 0) {
  const tile = new OffscreenCanvas(SIDE, SIDE);
  const image = tile.getContext("2d").createImageData(SIDE, SIDE);
  for (let i = 0; i < SIDE * SIDE; i++) {
    const grey = Math.round(255 * pixels[index * SIDE * SIDE + i]);
    image.data.set([grey, grey, grey, 255], 4 * i);
  }
  tile.getContext("2d").putImageData(image, 0, 0);
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false;
  const size = canvas.height;
  context.drawImage(tile, column * size, 0, size, size);
}

function showError(error) {
  const box = document.getElementById("error");
  box.textContent = String(error.message || error);
  box.hidden = false;
}

// Decode page.z and paint it; while a request is out, only the newest z waits for the next.
function update() {
  if (page.inFlight) { page.again = true; return; }
  page.inFlight = true;
  const start = performance.now();
  decode([page.z])
    .then((pixels) => {
      paint(document.getElementById("digit"), pixels);
      page.drawn.push(performance.now() - start);
      requestAnimationFrame(() => {  // the frame that shows it
        const ms = performance.now() - start;
        page.latencies.push(ms);
        document.getElementById("latency").textContent = `${ms.toFixed(1)} ms`;
      });
    })
    .catch(showError)
    .finally(() => {
      page.inFlight = false;
      if (page.again) { page.again = false; update(); }
    });
}

function setZ(z) {
  page.z = z;
  for (const slider of document.querySelectorAll("#sliders input")) {
    const value = z[Number(slider.dataset.dim)];
    slider.value = value.toFixed(1);  // the slider stops at +-3; its label shows z itself
    slider.nextElementSibling.value = value.toFixed(1);
  }
  update();
}

function buildSliders(order, spread) {
  const box = document.getElementById("sliders");
  for (const dim of order) {
    const row = document.createElement("div");
    row.className = "dim";
    row.innerHTML = `<label for="z${dim}">z[${dim}]</label>
      <input id="z${dim}" type="range" min="-3" max="3" step="0.1" value="0" data-dim="${dim}">
      <output for="z${dim}">0.0</output>
      <span class="spread">${spread ? `spread ${spread[dim].toFixed(2)}` : ""}</span>`;
    const slider = row.querySelector("input");
    slider.addEventListener("input", () => {
      page.z[dim] = Number(slider.value);
      slider.nextElementSibling.value = Number(slider.value).toFixed(1);
      update();
    });
    box.append(row);
  }
}

async function interpolate() {
  const a = priorSample(Number(document.getElementById("seed-a").value));
  const b = priorSample(Number(document.getElementById("seed-b").value));
  const rows = Array.from({ length: STRIP_STEPS }, (_, step) => {
    const t = step / (STRIP_STEPS - 1);
    return a.map((value, i) => (1 - t) * value + t * b[i]);
  });
  const pixels = await decode(rows);
  const strip = document.getElementById("strip");
  rows.forEach((_, i) => paint(strip, pixels, i, i));
}

// The drawing pad: strokes in white on black, 8 canvas pixels to an image pixel.
function setUpPad() {
  const pad = document.getElementById("pad");
  const context = pad.getContext("2d");
  const clear = () => { context.fillStyle = "#000"; context.fillRect(0, 0, pad.width, pad.height); };
  clear();
  Object.assign(context, { strokeStyle: "#fff", lineWidth: 18, lineCap: "round", lineJoin: "round" });
  let last = null;
  const at = (event) => {
    const box = pad.getBoundingClientRect();
    return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
  };
  const stroke = (event) => {
    const point = at(event);
    context.beginPath();
    context.moveTo(...(last || point));
    context.lineTo(...point);
    context.stroke();
    last = point;
  };
  pad.addEventListener("pointerdown", (event) => { pad.setPointerCapture(event.pointerId); last = null; stroke(event); });
  pad.addEventListener("pointermove", (event) => { if (last) stroke(event); });
  const release = () => { if (last) { last = null; encodeDrawing().catch(showError); } };
  pad.addEventListener("pointerup", release);
  pad.addEventListener("pointercancel", release);
  document.getElementById("clear").addEventListener("click", clear);
}

// The pad as an image: each 8x8 block's mean grey level, 784 numbers in [0, 1].
function padImage() {
  const pad = document.getElementById("pad");
  const scale = pad.width / SIDE;
  const rgba = pad.getContext("2d").getImageData(0, 0, pad.width, pad.height).data;
  const x = new Array(SIDE * SIDE).fill(0);
  for (let row = 0; row < pad.height; row++) {
    for (let col = 0; col < pad.width; col++) {
      x[Math.floor(row / scale) * SIDE + Math.floor(col / scale)] += rgba[4 * (row * pad.width + col)];
    }
  }
  return x.map((sum) => sum / (255 * scale * scale));
}

// Encode the drawing: the sliders jump to its latent mean, its decoding is the reconstruction.
async function encodeDrawing() {
  const x = padImage();
  page.drawing = x;
  const [{ mu }, { score }] = await Promise.all([
    infer("vae-encoder", "x", [x]), infer("vae-score", "x", [x], { seed: 0 })]);
  const pixels = await decode([mu]);
  paint(document.getElementById("reconstruction"), pixels);
  setZ(Array.from(mu));
  page.score = score[0];
  document.getElementById("score").textContent = `${score[0].toFixed(1)} nats (−L_k, seed 0: the larger, the less likely)`;
  page.encoded += 1;
}

async function start() {
  const meta = await call(`/v2/models/${MODEL}`);
  const { latent_dim: dim, latent_order: order, latent_spread: spread, latent_map: hasMap } = meta.parameters;
  page.input = meta.inputs[0].name;
  page.dim = dim;
  document.getElementById("model-info").textContent =
    `This decoder has ${dim} latent dimensions` + (spread ? ", ordered by how much it uses them." : ".");
  buildSliders(order, spread);
  const seed = document.getElementById("seed");
  const draw = () => setZ(priorSample(Number(seed.value)));
  document.getElementById("draw").addEventListener("click", draw);
  document.getElementById("random").addEventListener("click", () => {
    seed.value = Math.floor(Math.random() * 4294967296);
    draw();
  });
  document.getElementById("zero").addEventListener("click", () => setZ(new Array(dim).fill(0)));
  document.getElementById("interpolate").addEventListener("click", () => interpolate().catch(showError));
  if (hasMap) {
    document.getElementById("latent-map").src = "/v1/latent_map.png";
    document.getElementById("map-section").hidden = false;
  }
  const served = (await call("/v2")).models;
  if (served.includes("vae-encoder") && served.includes("vae-score")) {
    setUpPad();
    document.getElementById("draw-section").hidden = false;
  }
  setZ(new Array(dim).fill(0));
  await interpolate();
}

start().catch(showError);
