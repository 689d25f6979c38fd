// visual-memory explorer: plain JS against the JSON API of the same origin (no build step, no CDN).
"use strict";
const $ = (id) => document.getElementById(id);
let currentFile = null;          // the image being explained; re-classified after every edit
const objectUrls = [];           // thumbnails fetched with the token (reads may be protected)

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const t = $("token").value.trim();
  if (t) h["Authorization"] = "Bearer " + t;
  return h;
}

function say(text, isError) {
  $("message").textContent = text || "";
  $("message").className = "message" + (isError ? " error" : "");
}

async function api(path, opts) {
  const o = Object.assign({}, opts || {});
  o.headers = headers(o.headers);
  const r = await fetch(path, o);
  const isJson = (r.headers.get("content-type") || "").includes("json");
  const body = isJson ? await r.json() : await r.blob();
  if (!r.ok) throw new Error((body && body.error) || (r.status + " " + r.statusText));
  return body;
}

async function loadStats() {
  try {
    const s = await api("/v1/stats");
    const part = (name, v) => `${name} <b>${v === undefined || v === null ? "–" : v}</b>`;
    $("stats").innerHTML = [part("items", s.items), part("shards", s.shards), part("tombstones", s.tombstones),
      part("delta", s.delta_items), part("manifest version", s.version)].join(" · ");
  } catch (e) {
    $("stats").textContent = "stats: " + e.message;
  }
}

function setFile(file) {
  if (!file) return;
  currentFile = file;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("drop-hint").textContent = file.name || "image";
  $("classify").disabled = false;
  classify();
}

async function classify() {
  if (!currentFile) return;
  const fd = new FormData();
  fd.append("image", currentFile, currentFile.name || "query.png");
  fd.append("k", $("k").value);
  fd.append("method", $("method").value);
  say("classifying…");
  try {
    const p = await api("/v1/classify", { method: "POST", body: fd });
    render(p);
    say(`k=${p.k}, vote=${p.method}`);
  } catch (e) {
    say(e.message, true);
  }
  loadStats();
}

function render(p) {
  $("result").hidden = false;
  $("label").textContent = p.label_name;
  $("label").dataset.label = p.label;
  renderTrust(p);
  const scores = Object.entries(p.scores || {}).sort((a, b) => b[1] - a[1]);
  const max = scores.length ? Math.max(...scores.map((s) => s[1])) : 1;
  const bars = $("bars");
  bars.innerHTML = "";
  for (const [name, v] of scores) {
    const row = document.createElement("div");
    row.className = "bar" + (name === p.label_name ? " win" : "");
    row.innerHTML = `<span class="n"></span><div><div class="fill"></div></div><span class="v"></span>`;
    row.querySelector(".n").textContent = name;
    row.querySelector(".fill").style.width = (max > 0 ? (100 * v) / max : 0) + "%";
    row.querySelector(".v").textContent = Number(v).toFixed(3);
    bars.appendChild(row);
  }
  while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
  const grid = $("neighbors");
  grid.innerHTML = "";
  $("nk").textContent = p.neighbors.length;
  p.neighbors.forEach((n, rank) => grid.appendChild(neighborCard(n, rank, p.label)));
}

function num(x, digits) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

// Confidence (vote share, margin, entropy, calibrated probability), the OOD score and flag, an abstention,
// and with a reranker on, the order before (search ranks) and after (the order that voted).
function renderTrust(p) {
  const parts = [];
  if (p.probability !== null && p.probability !== undefined) parts.push(`calibrated p <b>${num(p.probability, 2)}</b>`);
  parts.push(`vote share <b>${num(p.confidence, 2)}</b>`, `margin <b>${num(p.margin, 2)}</b>`,
    `entropy <b>${num(p.entropy, 2)}</b>`, `OOD score <b>${num(p.ood_score, 3)}</b>`);
  const t = $("trust");
  t.innerHTML = parts.join(" · ");
  if (p.ood) t.insertAdjacentHTML("beforeend", ' · <span class="flag" id="ood-flag">out of distribution</span>');
  if (p.abstained) {
    const a = document.createElement("div");
    a.className = "abstain";
    a.id = "abstain";
    a.textContent = `abstained (the vote said ${p.voted_label}): ${p.abstain_reason}`;
    t.appendChild(a);
  }
  const r = $("rerank");
  r.hidden = !p.reranker;
  if (p.reranker) {
    const before = p.neighbors.map((n) => "#" + (n.rank_before + 1));
    r.textContent = `re-ranked by ${p.reranker}: search ranks of the voters, in their new order: ${before.join(" ")}`;
  }
}

function neighborCard(n, rank, predicted) {
  // Ids are 63-bit: a JS number would round them, so the exact id is read from the server-built URL.
  const itemUrl = n.image_url.replace(/\/image$/, "");
  const id = itemUrl.split("/").pop();
  const card = document.createElement("div");
  card.className = "nb";
  card.dataset.id = id;
  card.innerHTML = `<img alt="">
    <span class="lbl"></span>
    <span class="meta"></span>
    <div class="row"><button class="danger forget">forget</button></div>
    <div class="row"><input class="newlabel" type="number" min="0" placeholder="label">
      <button class="secondary relabel">relabel</button></div>`;
  const lbl = card.querySelector(".lbl");
  const was = n.rank_before === null || n.rank_before === undefined ? "" : ` (was #${n.rank_before + 1})`;
  lbl.textContent = `#${rank + 1}${was} ${n.label_name} (${n.label})`;
  lbl.classList.add(n.label === predicted ? "same" : "other");
  card.querySelector(".meta").textContent =
    `d=${Math.max(0, Number(n.distance)).toFixed(3)} w=${Number(n.weight).toFixed(3)} id=${id}`;
  api(n.image_url).then((blob) => {
    const u = URL.createObjectURL(blob);
    objectUrls.push(u);
    card.querySelector("img").src = u;
  }).catch(() => { card.querySelector("img").alt = "no image"; });
  card.querySelector(".forget").onclick = () => edit(`forgot item ${id}`,
    () => api(itemUrl, { method: "DELETE" }));
  card.querySelector(".relabel").onclick = () => {
    const v = card.querySelector(".newlabel").value;
    if (v === "") return say("type the new label (an integer class id) first", true);
    edit(`relabelled item ${id} as ${v}`, () => api(`${itemUrl}/relabel`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ label: Number(v) }),
    }));
  };
  return card;
}

async function edit(what, call) {
  try {
    await call();
    await classify();   // the memory changed: show its new answer at once
    say(what + "; re-classified");
  } catch (e) {
    say(e.message, true);
  }
}

function init() {
  $("token").value = sessionStorage.getItem("vmem-token") || "";
  $("token").addEventListener("change", () => sessionStorage.setItem("vmem-token", $("token").value));
  $("file").addEventListener("change", (e) => setFile(e.target.files[0]));
  $("classify").addEventListener("click", classify);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    setFile(e.dataTransfer.files[0]);
  });
  loadStats();
}
init();
