// The try-it page: one image at a time; the overlay (format=overlay) and the per-class table (format=json)
// come from the server, and the download is the answer in the chosen format. No build step, no libraries.
"use strict";

const EXTENSIONS = {"application/json": ".json", "image/png": ".png", "image/jpeg": ".jpg",
                    "application/x-npy": ".npy"};
const $ = (id) => document.getElementById(id);
let config = null;
let picked = null;
let urls = [];

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function ask(file, format) {
  // Multipart with the options as form fields (TorchServe drops query strings), and no custom header: in
  // direct mode this is a CORS "simple" request, so the browser sends no preflight.
  const body = new FormData();
  body.append("data", file, file.name);
  body.append("format", format);
  const classes = $("classes").value.trim();
  if (classes) body.append("classes", classes);
  let answer;
  try {
    answer = await fetch(config.predict_url, {method: "POST", body});
  } catch (error) {
    throw new Error(`cannot reach ${config.server}: is TorchServe running (make serve)? (${error.message})`);
  }
  const blob = await answer.blob();
  if (!answer.ok) {
    let message = `${answer.status} ${answer.statusText}`;
    try {
      const error = JSON.parse(await blob.text());
      message = `${error.code} ${error.type}: ${error.message}`;
    } catch (_) { /* not a JSON error body: keep the status line */ }
    throw new Error(message);
  }
  return {blob, type: (answer.headers.get("Content-Type") || "").split(";")[0].trim()};
}

function showTable(summary) {
  const body = $("classes-table").querySelector("tbody");
  body.replaceChildren();
  for (const c of summary.classes) {
    const row = body.insertRow();
    row.dataset.classId = c.id;
    row.insertCell().textContent = c.id;
    row.insertCell().textContent = c.name;
    const pixels = row.insertCell();
    pixels.textContent = c.pixels;
    pixels.className = "num";
    const share = row.insertCell();
    share.textContent = `${(100 * c.fraction).toFixed(2)} %`;
    share.className = "num";
  }
}

async function segment() {
  if (!picked) return;
  const file = picked;
  const format = $("format").value;
  $("run").disabled = true;
  status(`segmenting ${file.name}…`);
  try {
    const [summary, overlay] = await Promise.all([ask(file, "json"), ask(file, "overlay")]);
    const chosen = format === "json" ? summary : format === "overlay" ? overlay : await ask(file, format);
    const doc = JSON.parse(await summary.blob.text());
    urls.forEach(URL.revokeObjectURL);
    urls = [URL.createObjectURL(overlay.blob), URL.createObjectURL(chosen.blob)];
    $("overlay").src = urls[0];
    showTable(doc);
    $("caption").textContent = `${file.name}: ${doc.width} × ${doc.height}, ${doc.model} ${doc.version}`;
    const stem = file.name.replace(/\.[^.]*$/, "") || "mask";
    $("download").href = urls[1];
    $("download").download = stem + (EXTENSIONS[chosen.type] || ".bin");
    $("download").textContent = `Download ${$("download").download}`;
    $("result").hidden = false;
    status(`done: ${file.name}`);
  } catch (error) {
    status(error.message, true);
  } finally {
    $("run").disabled = false;
  }
}

function pick(file) {
  if (!file) return;
  picked = file;
  segment();
}

async function start() {
  config = await (await fetch("config.json")).json();
  $("server").textContent = `${config.model}${config.version ? " " + config.version : ""} at ${config.server}` +
    (config.mode === "relay" ? " (through this page's server)" : "");
  $("file").addEventListener("change", () => pick($("file").files[0]));
  $("run").addEventListener("click", segment);
  $("format").addEventListener("change", segment);
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    pick(event.dataTransfer.files[0]);
  });
  $("run").disabled = false;
  document.body.dataset.ready = "true";
}

start().catch((error) => status(`cannot load the page's settings: ${error.message}`, true));
