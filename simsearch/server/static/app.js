// The simsearch page: plain JavaScript, no framework, no build step. Everything the server or the
// user controls reaches the DOM through textContent or attributes, never through innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, key: null, queryId: null, previewUrl: null, seq: 0, hit: null };

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

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function options() {
  const where = $("where").value.trim();
  return {
    mode: document.querySelector("input[name=mode]:checked").value,
    k: $("k").value || "12",
    rerank: $("rerank").value,
    ...(where ? { where } : {}),
  };
}

async function search() {
  if (!state.file && !state.key) return;
  const seq = ++state.seq;
  const opts = options();
  setStatus(`searching (${opts.mode})…`);
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
  setStatus(`${result.hits.length} ${q.mode} hits` + (q.where ? ` where ${q.where}` : "") +
            (q.rerank !== "none" ? `, reranked by ${q.rerank}` : "") + ` (${ms})`);
  $("results").replaceChildren(...result.hits.map((hit) => {
    const name = hit.path.split("/").pop();
    return element("li", { class: "hit", "data-rank": hit.rank, "data-path": hit.path }, [
      element("button", { type: "button", class: "open", title: "show the correspondences with the query",
                          onclick: () => openMatch(hit) },
              [element("img", { src: `/api/thumb/${hit.key}`, alt: name, loading: "lazy" })]),
      element("div", { class: "meta" }, [
        element("span", { class: "rank", text: `#${hit.rank}` }),
        element("span", { class: "score", text: hit.score.toFixed(4) }),
      ]),
      element("p", { class: "path", title: hit.path, text: name }),
      element("button", { type: "button", class: "similar", text: "search from this",
                          onclick: () => useKey(hit.key, hit.path) }),
    ]);
  }));
}

function showPreview(src, alt) {
  const img = $("query-preview");
  img.src = src;
  img.alt = alt;
  img.hidden = false;
}

function useFile(file) {
  if (!file) return;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  Object.assign(state, { file, key: null, queryId: null });
  showPreview(state.previewUrl, `query: ${file.name || "pasted image"}`);
  search();
}

function useKey(key, path) {
  Object.assign(state, { file: null, key, queryId: null });
  showPreview(`/api/thumb/${key}`, `query: ${path}`);
  $("match").close();
  window.scrollTo({ top: 0, behavior: "smooth" });
  search();
}

function openMatch(hit) {
  state.hit = hit;
  const query = state.queryId ? { query_id: state.queryId } : { query_key: state.key };
  const url = `/api/match/${hit.key}?` + new URLSearchParams(query);
  $("match-title").textContent = `#${hit.rank} · score ${hit.score.toFixed(4)}`;
  $("match-path").textContent = hit.path;
  $("match-error").hidden = true;
  const picture = $("match-picture");
  picture.hidden = false;
  picture.onerror = async () => { // the body of a failed image request holds the server's message
    picture.hidden = true;
    const message = await api(url).then(() => "the picture could not be shown", (error) => error.message);
    $("match-error").textContent = message;
    $("match-error").hidden = false;
  };
  picture.src = url;
  const scores = Object.entries(hit.scores || {}).flatMap(([name, value]) =>
    [element("dt", { text: name.replace("_", " ") }), element("dd", { text: value.toFixed(4) })]);
  $("match-scores").replaceChildren(...scores);
  if (!$("match").open) $("match").showModal();
}

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
  drop.addEventListener("click", (event) => { if (!event.target.closest("label, input")) $("file").click(); });
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
  $("match-search").addEventListener("click", () => useKey(state.hit.key, state.hit.path));
  showInfo();
}

setUp();
