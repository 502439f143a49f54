// The simsearch page: plain JavaScript, no framework, no build step. Everything the server or the
// user controls reaches the DOM through textContent or attributes, never through innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const MATCH_HEIGHT = 256; // height of each side of the match view, in SVG units
const MIN_BOX_PX = 6; // a drag shorter than this (on screen) is a click, not a box
const PAGE = Math.max(1, Math.min(500, Number(new URLSearchParams(location.search).get("per_page")) || 48));
const DEDUP_PAGE = 20;
const PREVIEW_HEIGHT = 220; // tallest the query preview is drawn, CSS pixels
const state = {
  file: null, key: null, queryId: null, previewUrl: null, seq: 0, hit: null, result: null,
  size: null, box: null, // the query's pixel size and the dragged region in those pixels
  under: null, offset: 0, // the collection's folder and page
  dedupKey: null, dedupOffset: 0,
};

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function element(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function svgElement(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

const basename = (path) => path.split("/").pop();
const thumbUrl = (key) => `/api/thumb/${key}`;

function formatBytes(n) {
  if (n == null) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${units[i]}`;
}

// -- views -------------------------------------------------------------------------------------
function showView(name) {
  for (const view of ["collection", "results", "dedup"]) $(`${view}-view`).hidden = view !== name;
  for (const button of document.querySelectorAll(".views button")) {
    button.setAttribute("aria-pressed", String(button.dataset.view === name));
  }
  document.body.dataset.view = name;
}

// -- search ------------------------------------------------------------------------------------
function options() {
  const where = $("where").value.trim();
  return {
    mode: document.querySelector("input[name=mode]:checked").value,
    k: $("k").value || "12",
    rerank: $("rerank").value,
    ...(where ? { where } : {}),
    ...(state.box ? { box: state.box.join(",") } : {}),
  };
}

async function search() {
  if (!state.file && !state.key) return;
  const seq = ++state.seq;
  const opts = options();
  showView("results");
  setStatus(`searching (${opts.mode}${state.box ? ", region" : ""})…`);
  document.body.classList.add("busy");
  try {
    let result;
    if (state.file) {
      const form = new FormData();
      form.append("image", state.file, state.file.name || "pasted.png");
      for (const [name, value] of Object.entries(opts)) form.append(name, value);
      result = await api("/api/search", { method: "POST", body: form });
    } else {
      result = await api("/api/search?" + new URLSearchParams({ key: state.key, ...opts }));
    }
    if (seq !== state.seq) return; // a newer search has started
    state.queryId = result.query.id;
    state.result = result;
    if (!state.size && result.query.width) { state.size = [result.query.width, result.query.height]; setBox(state.box); }
    showResults(result);
  } catch (error) {
    if (seq === state.seq) {
      setStatus(error.message, true);
      $("results").replaceChildren();
    }
  } finally {
    if (seq === state.seq) document.body.classList.remove("busy");
  }
}

function showResults(result) {
  const q = result.query;
  const ms = Object.entries(result.ms).map(([stage, t]) => `${stage} ${Math.round(t)} ms`).join(", ");
  setStatus(`${result.hits.length} ${q.mode} hits` + (q.box ? ` for the region ${q.box.join(",")}` : "") +
            (q.where ? ` where ${q.where}` : "") +
            (q.rerank !== "none" ? `, reranked by ${q.rerank}` : "") + ` (${ms})`);
  $("results-empty").hidden = true;
  $("results").replaceChildren(...result.hits.map((hit) => {
    const name = basename(hit.path);
    const inliers = hit.matches ? ` · ${hit.matches.length} matches` : "";
    return element("li", { class: "hit", "data-rank": hit.rank, "data-path": hit.path, "data-key": hit.key }, [
      element("button", { type: "button", class: "open", title: "show the correspondences with the query",
                          onclick: () => openMatch(hit) },
              [element("img", { src: thumbUrl(hit.key), alt: name, loading: "lazy" })]),
      element("div", { class: "meta" }, [
        element("span", { class: "rank", text: `#${hit.rank}` }),
        element("span", { class: "score", text: hit.score.toFixed(4) + inliers }),
      ]),
      element("p", { class: "path", title: hit.path, text: name }),
      element("button", { type: "button", class: "similar", text: "search from this",
                          onclick: () => useKey(hit.key, hit.path, [hit.width, hit.height]) }),
    ]);
  }));
}

// -- the query and its region ------------------------------------------------------------------
// The preview fills the query area (a thumbnail is drawn larger than its pixels) at its own aspect.
function fitPreview() {
  const img = $("query-preview");
  if (!img.naturalWidth) return;
  const room = $("drop").clientWidth - 24;
  img.style.width = `${Math.floor(Math.min(room, PREVIEW_HEIGHT * img.naturalWidth / img.naturalHeight))}px`;
}

function showPreview(src, alt) {
  const img = $("query-preview");
  img.addEventListener("load", fitPreview, { once: true });
  img.src = src;
  img.alt = alt;
  $("region").hidden = false;
  $("drop-hint").hidden = true;
}

function setBox(box) {
  state.box = box;
  const shown = $("box");
  shown.hidden = !box;
  if (box) {
    const [w, h] = state.size;
    Object.assign(shown.style, { left: `${100 * box[0] / w}%`, top: `${100 * box[1] / h}%`,
                                 width: `${100 * (box[2] - box[0]) / w}%`, height: `${100 * (box[3] - box[1]) / h}%` });
  }
  $("region-note").hidden = !state.size;
  $("region-text").textContent = box ? `region ${box.join(",")} of ${state.size.join("×")} px`
                                     : "drag a box on the image to search for a region of it";
  $("region-clear").hidden = !box;
}

function useFile(file) {
  if (!file) return;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  Object.assign(state, { file, key: null, queryId: null, size: null });
  setBox(null);
  const img = $("query-preview");
  img.onload = () => { state.size = [img.naturalWidth, img.naturalHeight]; setBox(state.box); };
  showPreview(state.previewUrl, `query: ${file.name || "pasted image"}`);
  search();
}

// An indexed image becomes the query: searched at once, or (`region`) shown to drag a box on.
function useKey(key, path, size, region = false) {
  Object.assign(state, { file: null, key, queryId: null, size: size && size[0] ? size : null });
  $("query-preview").onload = null;
  setBox(null);
  showPreview(thumbUrl(key), `query: ${path}`);
  $("match").close();
  window.scrollTo({ top: 0, behavior: "smooth" });
  if (region) {
    setStatus(`drag a box on ${basename(path)} to search for that region`);
    $("drop").focus({ preventScroll: true });
  } else {
    search();
  }
}

function setUpRegion() {
  const wrap = $("region");
  let start = null;
  const point = (event) => {
    const r = $("query-preview").getBoundingClientRect();
    return [Math.min(Math.max(event.clientX - r.left, 0), r.width), Math.min(Math.max(event.clientY - r.top, 0), r.height), r];
  };
  const draw = (a, b) => {
    const r = b[2];
    Object.assign($("box").style, { left: `${100 * Math.min(a[0], b[0]) / r.width}%`, top: `${100 * Math.min(a[1], b[1]) / r.height}%`,
                                    width: `${100 * Math.abs(b[0] - a[0]) / r.width}%`, height: `${100 * Math.abs(b[1] - a[1]) / r.height}%` });
    $("box").hidden = false;
  };
  wrap.addEventListener("pointerdown", (event) => {
    if (!state.size || event.button !== 0) return;
    event.preventDefault();
    wrap.setPointerCapture(event.pointerId);
    start = point(event);
    draw(start, start);
  });
  wrap.addEventListener("pointermove", (event) => { if (start) draw(start, point(event)); });
  const finish = (event) => {
    if (!start) return;
    const end = point(event);
    const a = start;
    start = null;
    if (Math.abs(end[0] - a[0]) < MIN_BOX_PX || Math.abs(end[1] - a[1]) < MIN_BOX_PX) { setBox(state.box); return; }
    const r = end[2], [w, h] = state.size;
    const sx = w / r.width, sy = h / r.height;
    // pixels of the query image, the dragged area rounded outwards
    setBox([Math.max(0, Math.floor(Math.min(a[0], end[0]) * sx)), Math.max(0, Math.floor(Math.min(a[1], end[1]) * sy)),
            Math.min(w, Math.ceil(Math.max(a[0], end[0]) * sx)), Math.min(h, Math.ceil(Math.max(a[1], end[1]) * sy))]);
    search();
  };
  wrap.addEventListener("pointerup", finish);
  wrap.addEventListener("pointercancel", () => { start = null; setBox(state.box); });
  $("region-clear").addEventListener("click", () => { setBox(null); search(); });
}

// -- the match view ----------------------------------------------------------------------------
function openMatch(hit) {
  state.hit = hit;
  $("match-title").textContent = `#${hit.rank} · score ${hit.score.toFixed(4)}`;
  $("match-path").textContent = hit.path;
  $("match-error").hidden = true;
  if (hit.matches && hit.matches.length && hit.width && hit.height) drawMatches(hit, state.result.query);
  else matchPicture(hit);
  const scores = Object.entries(hit.scores || {}).flatMap(([name, value]) =>
    [element("dt", { text: name.replace("_", " ") }), element("dd", { text: Number.isInteger(value) ? String(value) : value.toFixed(4) })]);
  $("match-scores").replaceChildren(...scores);
  if (!$("match").open) $("match").showModal();
}

// The verified correspondences, drawn here: query left, hit right, both MATCH_HEIGHT high, and a line
// from each inlier's point in the query to its point in the hit (points are in each image's pixels).
function drawMatches(hit, query) {
  const [qw, qh] = query.frame, gap = 12;
  const qs = MATCH_HEIGHT / qh, hs = MATCH_HEIGHT / hit.height;
  const left = qw * qs, right = hit.width * hs, width = left + gap + right;
  const svg = $("match-lines");
  svg.setAttribute("viewBox", `0 0 ${width} ${MATCH_HEIGHT}`);
  const queryHref = state.file ? state.previewUrl : thumbUrl(query.key);
  const sides = [
    svgElement("image", { href: queryHref, x: 0, y: 0, width: left, height: MATCH_HEIGHT, preserveAspectRatio: "none" }),
    svgElement("image", { href: thumbUrl(hit.key), x: left + gap, y: 0, width: right, height: MATCH_HEIGHT, preserveAspectRatio: "none" }),
  ];
  const n = hit.matches.length;
  const lines = hit.matches.map((m, i) => {
    const colour = `hsl(${Math.round(360 * i / n)} 90% 50%)`;
    const [x1, y1, x2, y2] = [m.query[0] * qs, m.query[1] * qs, left + gap + m.hit[0] * hs, m.hit[1] * hs];
    const group = svgElement("g", { class: "match-line", stroke: colour, fill: colour });
    group.append(svgElement("line", { x1, y1, x2, y2 }), svgElement("circle", { cx: x1, cy: y1, r: 2.5 }),
                 svgElement("circle", { cx: x2, cy: y2, r: 2.5 }));
    return group;
  });
  svg.replaceChildren(...sides, ...lines);
  svg.removeAttribute("hidden"); // an SVG element has no `hidden` property
  $("match-picture").hidden = true;
  $("match-caption").textContent = `query (left) and hit (right): ${n} verified correspondences` +
                                   (query.box ? ` of the region ${query.box.join(",")}` : "");
}

// Without verified correspondences: the server's picture of best-buddy pairs.
function matchPicture(hit) {
  const query = state.queryId ? { query_id: state.queryId } : { query_key: state.key };
  const url = `/api/match/${hit.key}?` + new URLSearchParams(query);
  $("match-lines").setAttribute("hidden", "");
  $("match-caption").textContent = "query (left) and hit (right); numbered pairs are their best-buddy correspondences";
  const picture = $("match-picture");
  picture.hidden = false;
  picture.onerror = async () => { // the body of a failed image request holds the server's message
    picture.hidden = true;
    const message = await api(url).then(() => "the picture could not be shown", (error) => error.message);
    $("match-error").textContent = message;
    $("match-error").hidden = false;
  };
  picture.src = url;
}

// -- the collection ----------------------------------------------------------------------------
async function loadCollection() {
  const order = $("order").value;
  const params = { offset: state.offset, limit: PAGE, order, ...(state.under ? { under: state.under } : {}) };
  try {
    const [page, folders] = await Promise.all([
      api("/api/images?" + new URLSearchParams(params)),
      api("/api/folders?" + new URLSearchParams(state.under ? { under: state.under } : {})),
    ]);
    showFolders(folders);
    showGrid(page);
  } catch (error) {
    $("page-info").textContent = error.message;
    $("grid").replaceChildren();
  }
}

function goToFolder(folder) {
  state.under = folder;
  state.offset = 0;
  loadCollection();
}

function showFolders(summary) {
  const crumbs = [];
  if (summary.folder) {
    const parts = summary.folder.split("/");
    parts.forEach((part, i) => {
      const path = parts.slice(0, i + 1).join("/") || "/";
      if (i) crumbs.push(element("span", { class: "sep", text: "/" }));
      const last = i === parts.length - 1;
      crumbs.push(element("button", { type: "button", class: last ? "crumb current" : "crumb", text: part || "/",
                                      ...(last ? { "aria-current": "true" } : {}), onclick: () => goToFolder(path) }));
    });
  }
  crumbs.push(element("span", { class: "count muted", text: ` ${summary.images} images` }));
  $("crumbs").replaceChildren(...crumbs);
  const subfolders = summary.folders.map((f) => element("li", {}, [
    element("button", { type: "button", class: "folder", "data-path": f.path, title: f.path,
                        onclick: () => goToFolder(f.path) },
            [element("span", { text: f.name }), element("span", { class: "muted", text: ` ${f.images}` })]),
  ]));
  if (summary.more_folders) subfolders.push(element("li", { class: "muted", text: `and ${summary.more_folders} more` }));
  $("subfolders").replaceChildren(...subfolders);
}

function showGrid(page) {
  const first = page.total ? page.offset + 1 : 0, last = page.offset + page.images.length;
  $("page-info").textContent = `${first}–${last} of ${page.total}`;
  $("prev").disabled = page.offset === 0;
  $("next").disabled = last >= page.total;
  $("grid").replaceChildren(...page.images.map((item) => {
    const name = basename(item.path);
    const size = [item.width, item.height];
    const when = new Date(item.mtime * 1000).toLocaleDateString();
    return element("li", { class: "tile", "data-key": item.key, "data-path": item.path }, [
      element("button", { type: "button", class: "open", title: `search from ${name}`,
                          onclick: () => useKey(item.key, item.path, size) },
              [element("img", { src: thumbUrl(item.key), alt: name, loading: "lazy" })]),
      element("p", { class: "path", title: item.path, text: name }),
      element("p", { class: "facts muted", text: `${item.width}×${item.height} · ${formatBytes(item.bytes)}` }),
      element("p", { class: "facts muted", text: when, title: new Date(item.mtime * 1000).toLocaleString() }),
      element("div", { class: "actions" }, [
        element("button", { type: "button", class: "search-this", text: "search", title: "search from this image",
                            onclick: () => useKey(item.key, item.path, size) }),
        element("button", { type: "button", class: "region-this", text: "region", title: "drag a box on this image to search for a region of it",
                            onclick: () => useKey(item.key, item.path, size, true) }),
        element("button", { type: "button", class: "dups-this", text: "duplicates", title: "this image's duplicate group",
                            onclick: () => openDedup(item.key, name) }),
      ]),
    ]);
  }));
}

// -- duplicates --------------------------------------------------------------------------------
function openDedup(key = null, name = null) {
  state.dedupKey = key;
  state.dedupOffset = 0;
  $("dedup-scope").textContent = key ? `the group of ${name}` : (state.under ? `under ${state.under}` : "");
  $("dedup-all").hidden = !key;
  showView("dedup");
  loadDedup();
}

async function loadDedup() {
  const threshold = $("threshold").value.trim();
  const params = { limit: DEDUP_PAGE, offset: state.dedupOffset, ...(threshold ? { threshold } : {}),
                   ...(state.under && !state.dedupKey ? { under: state.under } : {}),
                   ...(state.dedupKey ? { key: state.dedupKey } : {}) };
  $("dedup-summary").textContent = "finding duplicates…";
  $("dedup-summary").classList.remove("error");
  try {
    const result = await api("/api/dedup?" + new URLSearchParams(params));
    showDedup(result);
  } catch (error) {
    $("dedup-summary").textContent = error.message;
    $("dedup-summary").classList.add("error");
    $("groups").replaceChildren();
  }
}

// A copy's line: its verified score, inliers and (when the server measured it) the pixels' agreement.
function memberFacts(m) {
  const agreement = Number.isFinite(m.agreement) ? [`agreement ${m.agreement.toFixed(2)}`] : [];
  return [`score ${Number(m.score).toFixed(3)}`, `${m.inliers} inliers`, ...agreement, formatBytes(m.bytes)].join(" · ");
}

function showDedup(result) {
  // A server that does not know `key` returns every group: keep the one that holds it.
  const groups = state.dedupKey ? result.groups.filter((g) => g.members.some((m) => m.key === state.dedupKey)) : result.groups;
  $("dedup-summary").textContent = state.dedupKey && !groups.length ? "this image has no duplicates" :
    `${groups.length} groups · ${formatBytes(result.reclaimable_bytes)} reclaimable · ${result.pairs_verified} pairs verified`;
  $("dedup-prev").disabled = state.dedupOffset === 0;
  $("dedup-next").disabled = state.dedupKey !== null || result.groups.length < DEDUP_PAGE;
  $("dedup-page").textContent = `groups ${state.dedupOffset + 1}–${state.dedupOffset + result.groups.length}`;
  $("groups").replaceChildren(...groups.map((group) => {
    const reclaimable = group.members.filter((m) => m.key !== group.representative).reduce((s, m) => s + (m.bytes || 0), 0);
    return element("li", { class: "group", "data-group": group.group }, [
      element("h3", { text: `group ${group.group} · ${group.members.length} images · ${formatBytes(reclaimable)} reclaimable` }),
      element("ol", { class: "members" }, group.members.map((m) => {
        const keep = m.key === group.representative;
        const role = keep ? "keep" : m.role;
        return element("li", { class: `member${keep ? " representative" : ""}`, "data-key": m.key, "data-role": role }, [
          element("img", { src: thumbUrl(m.key), alt: basename(m.path), loading: "lazy" }),
          element("span", { class: `role ${role}`, text: role }),
          element("p", { class: "path", title: m.path, text: basename(m.path) }),
          element("p", { class: "facts muted", text: keep ? formatBytes(m.bytes) :
            memberFacts(m) }),
          element("button", { type: "button", class: "similar", text: "search from this",
                              onclick: () => useKey(m.key, m.path, null) }),
        ]);
      })),
    ]);
  }));
}

// -- the database ------------------------------------------------------------------------------
async function showInfo() {
  try {
    const info = await api("/api/info");
    $("db-summary").textContent = `${info.rows} images · ${info.config.model}`;
    const entries = [
      ["database", info.db], ["images", info.rows], ["table version", info.table_version],
      ...Object.entries(info.config).map(([name, value]) => [name.replaceAll("_", " "), value ?? "default"]),
      ["weights", info.weights],
      ["dense tensor", `${info.dense.shape.join("×")} ${info.dense.dtype}`],
      ...Object.entries(info.ann).map(([column, s]) => [`faiss ${column}`, Object.entries(s).map(([k, v]) => `${k}=${v}`).join(" ")]),
      ["upload limit", `${(info.server.max_upload_bytes / 1048576).toFixed(1)} MiB`],
    ];
    $("info-list").replaceChildren(...entries.flatMap(([name, value]) =>
      [element("dt", { text: name }), element("dd", { text: String(value) })]));
  } catch (error) {
    $("db-summary").textContent = error.message;
  }
}

function setUp() {
  const drop = $("drop");
  drop.addEventListener("click", (event) => { if (!event.target.closest("label, input, #region")) $("file").click(); });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file").click(); } });
  $("file").addEventListener("change", () => useFile($("file").files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    useFile([...event.dataTransfer.files].find((f) => f.type.startsWith("image/")) || event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = [...event.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) { event.preventDefault(); useFile(item.getAsFile()); }
  });
  $("controls").addEventListener("submit", (event) => event.preventDefault()); // "change" searches
  $("controls").addEventListener("change", search);
  $("match-close").addEventListener("click", () => $("match").close());
  $("match").addEventListener("click", (event) => { if (event.target === $("match")) $("match").close(); });
  $("match-search").addEventListener("click", () => useKey(state.hit.key, state.hit.path, [state.hit.width, state.hit.height]));
  for (const button of document.querySelectorAll(".views button")) {
    button.addEventListener("click", () => (button.dataset.view === "dedup" ? openDedup() : showView(button.dataset.view)));
  }
  $("order").addEventListener("change", () => { state.offset = 0; loadCollection(); });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadCollection(); });
  $("next").addEventListener("click", () => { state.offset += PAGE; loadCollection(); });
  $("dedup-controls").addEventListener("submit", (event) => event.preventDefault());
  $("threshold").addEventListener("change", () => { state.dedupOffset = 0; loadDedup(); });
  $("dedup-all").addEventListener("click", () => openDedup());
  $("dedup-prev").addEventListener("click", () => { state.dedupOffset = Math.max(0, state.dedupOffset - DEDUP_PAGE); loadDedup(); });
  $("dedup-next").addEventListener("click", () => { state.dedupOffset += DEDUP_PAGE; loadDedup(); });
  setUpRegion();
  window.addEventListener("resize", fitPreview);
  showView("collection");
  showInfo();
  loadCollection();
}

setUp();
