// The page: health banner, gallery, enrollment and search over the service's own API (docs/API.md).

import {
  ApiError,
  deleteJSON,
  getJSON,
  imageURL,
  postForm,
  postFormWithProgress,
  storedKey,
  storeKey,
} from "./api.js";
import { formatDistance, formatTime, h, localInputToISO } from "./dom.js";
import { createMaskViewer, entrySource, uploadSource } from "./masks.js";
import { createPeopleView } from "./people.js";

const $ = (selector) => document.querySelector(selector);
const GALLERY_PAGE = 24; // identities per page
const ENTRY_PAGE = 48; // crops per page of one identity
const ENROLL_BATCH = 16; // crops per request, well under the service's REID_MAX_FILES_PER_REQUEST (64)

const masks = createMaskViewer($("#mask-dialog"));
let health = null;

// -- errors and the API key -------------------------------------------------------------------------

function showError(error) {
  if (error instanceof ApiError && error.status === 401) {
    askForKey(storedKey() ? "The service refused the key: enter it again." : "");
    return;
  }
  $("#error-text").textContent = error instanceof Error ? error.message : String(error);
  $("#error").hidden = false;
}

function clearError() {
  $("#error").hidden = true;
  $("#error-text").textContent = "";
}

$("#error-close").addEventListener("click", clearError);

let keyWaiters = [];

function askForKey(message) {
  const dialog = $("#key-dialog");
  $("#key-message").textContent = message;
  $("#key-message").hidden = !message;
  $("#key-button").hidden = false;
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("#key-dialog").addEventListener("cancel", (event) => {
  if (!storedKey()) event.preventDefault(); // nothing works without a key: keep asking
});

$("#key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("#key-input").value.trim();
  if (!key) return;
  storeKey(key);
  try {
    await getJSON("/identities", { limit: 1 }); // the cheapest call that needs the key
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      storeKey(null);
      $("#key-message").textContent = "The service refused this key.";
      $("#key-message").hidden = false;
      $("#key-input").select();
      return;
    }
    showError(error);
  }
  $("#key-input").value = "";
  $("#key-dialog").close();
  const waiters = keyWaiters;
  keyWaiters = [];
  for (const resolve of waiters) resolve();
  refreshAll();
});

$("#key-button").addEventListener("click", () => askForKey(""));

// -- health -----------------------------------------------------------------------------------------

function provenanceItems(provenance) {
  const items = Object.entries(provenance || {})
    .filter(([, value]) => value === null || typeof value !== "object")
    .slice(0, 12)
    .map(([name, value]) => h("li", {}, h("span", { class: "muted" }, `${name}: `), String(value)));
  // Calibrated thresholds, as training's recipe writes them: [{fmr, distance, tmr}, ...].
  const thresholds = Array.isArray(provenance?.thresholds) ? provenance.thresholds : [];
  for (const t of thresholds) {
    if (typeof t?.fmr !== "number" || typeof t?.distance !== "number") continue;
    const tmr = typeof t.tmr === "number" ? `, TMR ${t.tmr.toFixed(3)}` : "";
    items.push(h("li", {}, h("span", { class: "muted" }, `threshold at FMR ${t.fmr}: `), `${formatDistance(t.distance)}${tmr}`));
  }
  return items;
}

async function loadHealth() {
  const banner = $("#health");
  try {
    health = (await getJSON("/health")).body;
  } catch (error) {
    banner.className = "health bad";
    banner.replaceChildren(h("p", {}, `The service does not answer: ${error.message}`));
    return;
  }
  const facts = [
    ["Model", `${health.backbone}, ${health.feat_dim}-d templates`],
    ["Weights", health.weights || "none"],
    ["Mask generator", health.mask_generator ? "yes" : "no"],
    ["Device", health.device],
    ["Gallery", `${health.gallery_size} ${health.gallery_size === 1 ? "entry" : "entries"}`],
    ["Ready", health.ready ? "yes" : "starting"],
  ];
  const children = [
    h("dl", { class: "facts" }, facts.map(([name, value]) => h("div", {}, h("dt", {}, name), h("dd", {}, value)))),
  ];
  if (!health.trained_weights) {
    children.unshift(
      h("p", { class: "untrained", id: "untrained-warning" }, h("strong", {}, "Untrained weights. "), health.warning || "Matches are meaningless."),
    );
  }
  const items = provenanceItems(health.provenance);
  if (items.length) children.push(h("details", {}, h("summary", {}, "Provenance"), h("ul", { class: "provenance" }, items)));
  banner.className = health.trained_weights ? "health" : "health bad";
  banner.replaceChildren(...children);
}

// -- tabs -------------------------------------------------------------------------------------------

const TABS = ["gallery", "people", "enroll", "search"];

function selectTab(name) {
  for (const tab of TABS) {
    $(`#view-${tab}`).hidden = tab !== name;
    if (tab === name) $(`#tab-${tab}`).setAttribute("aria-current", "page");
    else $(`#tab-${tab}`).removeAttribute("aria-current");
  }
}

for (const tab of TABS) {
  $(`#tab-${tab}`).addEventListener("click", () => {
    selectTab(tab);
    if (tab === "people") people.refresh(); // loaded when looked at, fresh each time
  });
}

// -- crops, fetched with the key --------------------------------------------------------------------

const crops = new Map(); // entry id -> Promise of an object URL, oldest first
const CROPS_KEPT = 500; // object URLs kept for reuse; a long session releases the oldest

function cropImage(entryId, alt) {
  const image = h("img", { alt, class: "crop", "data-entry": entryId });
  if (!crops.has(entryId)) {
    crops.set(entryId, imageURL(`/gallery/${entryId}/image`));
    if (crops.size > CROPS_KEPT) forgetCrops([crops.keys().next().value]);
  }
  crops
    .get(entryId)
    .then((url) => {
      image.src = url;
    })
    .catch(() => {
      crops.delete(entryId);
      image.classList.add("broken");
    });
  return image;
}

function forgetCrops(ids) {
  for (const id of ids) {
    const pending = crops.get(id);
    crops.delete(id);
    if (pending) pending.then((url) => URL.revokeObjectURL(url)).catch(() => {});
  }
}

function confirmDelete(text) {
  const dialog = $("#confirm-dialog");
  $("#confirm-text").textContent = text;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"), { once: true }));
}

// -- people (people.js) ------------------------------------------------------------------------------

const people = createPeopleView({ cropImage, showError, clearError });

// -- gallery ----------------------------------------------------------------------------------------

const gallery = { offset: 0, total: 0, identity: null, entries: [], entryTotal: 0 };

async function loadGallery() {
  let answer;
  try {
    answer = await getJSON("/identities", { offset: gallery.offset, limit: GALLERY_PAGE });
  } catch (error) {
    showError(error);
    return;
  }
  let identities = answer.body;
  const header = answer.headers.get("X-Total-Count");
  gallery.total = header === null ? identities.length : Number(header);
  if (!identities.length && gallery.offset > 0) {
    gallery.offset = Math.max(0, gallery.offset - GALLERY_PAGE); // the last page emptied: step back
    return loadGallery();
  }
  if (header === null) identities = identities.slice(0, GALLERY_PAGE); // a service without paging
  const list = $("#identity-list");
  list.replaceChildren(
    ...identities.map((item) =>
      h(
        "li",
        { class: "identity-card", "data-identity": item.identity },
        h(
          "button",
          { type: "button", class: "card-button", "aria-label": `Open ${item.identity}`, onclick: () => openIdentity(item.identity) },
          item.thumbnail ? cropImage(item.thumbnail, `First crop of ${item.identity}`) : h("span", { class: "crop placeholder" }),
          h("span", { class: "identity-name" }, item.identity),
          h("span", { class: "muted" }, `${item.entries} ${item.entries === 1 ? "crop" : "crops"}`),
        ),
      ),
    ),
  );
  const first = identities.length ? gallery.offset + 1 : 0;
  const last = gallery.offset + identities.length;
  $("#gallery-count").textContent = `${gallery.total} ${gallery.total === 1 ? "identity" : "identities"}`;
  $("#gallery-range").textContent = gallery.total ? `${first}–${last} of ${gallery.total}` : "";
  $("#gallery-prev").disabled = gallery.offset === 0;
  $("#gallery-next").disabled = last >= gallery.total;
  $("#gallery-empty").hidden = gallery.total > 0;
}

$("#gallery-prev").addEventListener("click", () => {
  gallery.offset = Math.max(0, gallery.offset - GALLERY_PAGE);
  loadGallery();
});
$("#gallery-next").addEventListener("click", () => {
  gallery.offset += GALLERY_PAGE;
  loadGallery();
});
$("#gallery-refresh").addEventListener("click", () => refreshAll());

function entryCard(entry, { deletable }) {
  const metadata = Object.entries(entry.metadata || {});
  const when = entry.captured_at
    ? [h("dt", {}, "Captured"), h("dd", {}, formatTime(entry.captured_at))]
    : [];
  return h(
    "li",
    { class: "entry-card", "data-entry": entry.id },
    cropImage(entry.id, `Crop ${entry.id} of ${entry.identity}`),
    h(
      "dl",
      { class: "entry-facts" },
      h("dt", {}, "Entry"),
      h("dd", {}, `#${entry.id}`),
      h("dt", {}, "Camera"),
      h("dd", {}, entry.camera || "—"),
      when,
      h("dt", {}, "Enrolled"),
      h("dd", {}, formatTime(entry.created_at)),
      h("dt", {}, "Size"),
      h("dd", {}, `${entry.width}×${entry.height}`),
      metadata.map(([name, value]) => [h("dt", {}, name), h("dd", {}, typeof value === "string" ? value : JSON.stringify(value))]),
    ),
    h(
      "div",
      { class: "card-actions" },
      h("button", { type: "button", class: "secondary", onclick: () => masks.open(entrySource(entry)) }, "Masks"),
      deletable
        ? h("button", { type: "button", class: "danger", onclick: () => deleteEntry(entry), "aria-label": `Delete entry ${entry.id}` }, "Delete")
        : null,
    ),
  );
}

async function openIdentity(identity, { more = false } = {}) {
  if (!more) {
    gallery.identity = identity;
    gallery.entries = [];
  }
  let page;
  try {
    page = (await getJSON("/gallery", { identity, offset: gallery.entries.length, limit: ENTRY_PAGE })).body;
  } catch (error) {
    showError(error);
    return;
  }
  gallery.entries = gallery.entries.concat(page.items);
  gallery.entryTotal = page.total;
  const detail = $("#identity-detail");
  $("#identity-heading").textContent = `${identity}: ${page.total} ${page.total === 1 ? "crop" : "crops"}`;
  $("#entry-list").replaceChildren(...gallery.entries.map((entry) => entryCard(entry, { deletable: true })));
  $("#entry-more").hidden = gallery.entries.length >= page.total;
  detail.hidden = false;
  if (!more) detail.scrollIntoView({ block: "nearest" });
}

$("#entry-more").addEventListener("click", () => openIdentity(gallery.identity, { more: true }));
$("#identity-close").addEventListener("click", () => {
  $("#identity-detail").hidden = true;
  gallery.identity = null;
});

async function deleteEntry(entry) {
  if (!(await confirmDelete(`Delete entry #${entry.id} of ${entry.identity}? Its crop leaves the gallery for good.`))) return;
  try {
    await deleteJSON(`/gallery/${entry.id}`);
  } catch (error) {
    showError(error);
    return;
  }
  forgetCrops([entry.id]);
  const remaining = gallery.entryTotal - 1;
  if (remaining > 0) await openIdentity(entry.identity);
  else $("#identity-detail").hidden = true;
  await Promise.all([loadGallery(), loadHealth()]);
}

$("#identity-delete").addEventListener("click", async () => {
  const identity = gallery.identity;
  if (!identity) return;
  const count = gallery.entryTotal;
  if (!(await confirmDelete(`Delete ${identity} and all ${count} of its ${count === 1 ? "crop" : "crops"}?`))) return;
  try {
    await deleteJSON(`/identities/${encodeURIComponent(identity)}`);
  } catch (error) {
    showError(error);
    return;
  }
  forgetCrops(gallery.entries.map((entry) => entry.id));
  gallery.identity = null;
  $("#identity-detail").hidden = true;
  await Promise.all([loadGallery(), loadHealth()]);
});

// -- choosing crops: a file input inside a drop zone -------------------------------------------------

function fileChooser(input, zone, list) {
  let files = [];
  const previews = [];

  function render() {
    for (const url of previews.splice(0)) URL.revokeObjectURL(url);
    list.replaceChildren(
      ...files.map((file, index) => {
        const url = URL.createObjectURL(file);
        previews.push(url);
        return h(
          "li",
          {},
          h("img", { src: url, alt: file.name, class: "crop small" }),
          h("span", { class: "file-name" }, file.name),
          h("button", { type: "button", class: "link", "aria-label": `Remove ${file.name}`, onclick: () => {
            files.splice(index, 1);
            render();
          } }, "Remove"),
        );
      }),
    );
  }

  function set(chosen) {
    files = [...chosen].filter((file) => file.type.startsWith("image/") || file.type === "");
    render();
  }

  input.addEventListener("change", () => set(input.files));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    set(event.dataTransfer.files);
  });
  return {
    get files() {
      return files;
    },
    clear() {
      files = [];
      input.value = "";
      render();
    },
  };
}

// -- enroll -----------------------------------------------------------------------------------------

const enrollFiles = fileChooser($("#enroll-files"), $("#enroll-drop"), $("#enroll-chosen"));

$("#enroll-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearError();
  const identity = $("#enroll-identity").value.trim();
  const files = enrollFiles.files;
  if (!files.length) return showError(new Error("Choose or drop at least one crop to enroll."));
  if (!identity) return showError(new Error("Give the identity these crops show."));
  const fields = {
    identity,
    camera: $("#enroll-camera").value.trim(),
    metadata: $("#enroll-metadata").value.trim(),
    captured_at: localInputToISO($("#enroll-captured").value), // sent only when given
  };
  const progress = $("#enroll-progress");
  const status = $("#enroll-status");
  const submit = $("#enroll-submit");
  const totalBytes = files.reduce((sum, file) => sum + file.size, 0) || 1;
  const created = [];
  let doneBytes = 0;
  submit.disabled = true;
  progress.hidden = false;
  progress.value = 0;
  $("#enroll-result").hidden = true;
  try {
    for (let start = 0; start < files.length; start += ENROLL_BATCH) {
      const batch = files.slice(start, start + ENROLL_BATCH);
      const form = new FormData();
      for (const file of batch) form.append("files", file, file.name);
      for (const [name, value] of Object.entries(fields)) if (value) form.append(name, value);
      const batchBytes = batch.reduce((sum, file) => sum + file.size, 0);
      status.textContent = `Uploading crops ${start + 1}–${start + batch.length} of ${files.length}…`;
      const entries = await postFormWithProgress("/gallery", form, (sent, total) => {
        progress.value = (doneBytes + (batchBytes * sent) / total) / totalBytes;
        if (sent >= total) status.textContent = `Embedding crops ${start + 1}–${start + batch.length} of ${files.length}…`;
      });
      doneBytes += batchBytes;
      progress.value = doneBytes / totalBytes;
      created.push(...entries);
    }
    status.textContent = `Enrolled ${created.length} ${created.length === 1 ? "crop" : "crops"} of ${identity}.`;
    enrollFiles.clear();
  } catch (error) {
    status.textContent = created.length
      ? `${created.length} of ${files.length} crops were enrolled before the error.`
      : "Nothing was enrolled.";
    showError(error);
  } finally {
    submit.disabled = false;
    progress.hidden = true;
  }
  if (created.length) {
    $("#enroll-created").replaceChildren(...created.map((entry) => entryCard(entry, { deletable: false })));
    $("#enroll-result").hidden = false;
    await Promise.all([loadGallery(), loadHealth()]);
  }
});

// -- search -----------------------------------------------------------------------------------------

const searchFiles = fileChooser($("#search-files"), $("#search-drop"), $("#search-chosen"));

function thresholdLine(result) {
  if (result.threshold === null || result.threshold === undefined) {
    return "No threshold in use: every identity counts as a match. Give one to judge matches.";
  }
  const source = result.threshold_source ? ` (from ${result.threshold_source})` : "";
  return `Match when the distance is at most ${formatDistance(result.threshold)}${source}.`;
}

let queryURLs = []; // the shown query crops' object URLs, revoked at the next search

function queryCrops(files) {
  return h(
    "ul",
    { class: "query-crops" },
    files.map((file) => {
      const url = URL.createObjectURL(file);
      queryURLs.push(url);
      return h(
        "li",
        {},
        h("img", { src: url, alt: `Query crop ${file.name}`, class: "crop" }),
        h("button", { type: "button", class: "secondary", onclick: () => masks.open(uploadSource(file)) }, "Masks"),
      );
    }),
  );
}

function resultSection(result, files, index, filtered) {
  const title = files.length > 1 ? `Track of ${files.length} crops` : `Query ${result.filename || files[0].name}`;
  const bestEntry = new Map();
  for (const match of result.matches) if (!bestEntry.has(match.identity)) bestEntry.set(match.identity, match);
  const identityRows = result.identities.map((identity, rank) => {
    const best = bestEntry.get(identity.identity);
    return h(
      "tr",
      { class: identity.match ? "is-match" : "no-match", "data-identity": identity.identity },
      h("td", {}, String(rank + 1)),
      h("td", {}, best ? cropImage(best.id, `Best crop of ${identity.identity}`) : ""),
      h("th", { scope: "row" }, identity.identity),
      h("td", { class: "number" }, formatDistance(identity.distance)),
      h("td", { class: "number" }, formatDistance(identity.similarity)),
      h("td", { class: "number" }, identity.hits === undefined ? "" : String(identity.hits)),
      h("td", {}, h("span", { class: identity.match ? "badge match" : "badge miss" }, identity.match ? "Match" : "No match")),
    );
  });
  return h(
    "section",
    { class: "panel result", "aria-labelledby": `result-${index}` },
    h("h3", { id: `result-${index}` }, title),
    queryCrops(files),
    h("p", { class: "threshold" }, thresholdLine(result)),
    result.identities.length
      ? h(
          "table",
          { class: "ranking" },
          h("caption", {}, "Identities, nearest first"),
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["Rank", "Best crop", "Identity", "Distance", "Similarity", "Hits", "Verdict"].map((name) => h("th", { scope: "col" }, name)),
            ),
          ),
          h("tbody", {}, identityRows),
        )
      : h("p", { class: "muted" }, filtered ? "No entries match the filters." : "The gallery has no entries yet."),
    // What the score is: calibrated (1 - the false-match rate) or not, in the service's own words.
    result.identities.length ? h("p", { class: "muted similarity-meaning" }, `Similarity: ${result.similarity_meaning}.`) : null,
    result.matches.length ? h("h4", {}, "Entries, nearest first") : null,
    h(
      "ol",
      { class: "entry-grid matches" },
      result.matches.map((match) =>
        h(
          "li",
          { class: "entry-card", "data-entry": match.id },
          cropImage(match.id, `Crop ${match.id} of ${match.identity}`),
          h(
            "dl",
            { class: "entry-facts" },
            h("dt", {}, "Identity"),
            h("dd", {}, match.identity),
            h("dt", {}, "Camera"),
            h("dd", {}, match.camera || "—"),
            match.captured_at ? [h("dt", {}, "Captured"), h("dd", {}, formatTime(match.captured_at))] : null,
            h("dt", {}, "Distance"),
            h("dd", {}, formatDistance(match.distance)),
            h("dt", {}, "Similarity"),
            h("dd", {}, formatDistance(match.similarity)),
          ),
          h("div", { class: "card-actions" }, h("button", { type: "button", class: "secondary", onclick: () => masks.open(entrySource(match)) }, "Masks")),
        ),
      ),
    ),
  );
}

$("#search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearError();
  const files = [...searchFiles.files];
  if (!files.length) return showError(new Error("Choose or drop a crop to search for."));
  const form = new FormData();
  for (const file of files) form.append("file", file, file.name);
  form.append("top_k", $("#search-topk").value || "10");
  const threshold = $("#search-threshold").value.trim();
  if (threshold) form.append("threshold", threshold);
  const cameras = $("#search-cameras").value.split(",").map((camera) => camera.trim()).filter(Boolean);
  if (cameras.length) {
    // `camera` + `exclude_camera` take one camera; services that rank tracks also take the lists.
    const exclude = $("#search-camera-mode").value === "true";
    form.append("camera", cameras[0]);
    form.append("exclude_camera", String(exclude));
    for (const camera of cameras) form.append(exclude ? "exclude_cameras" : "cameras", camera);
  }
  for (const name of ["after", "before"]) {
    const value = localInputToISO($(`#search-${name}`).value);
    if (value) form.append(name, value);
  }
  const filtered = form.has("camera") || form.has("after") || form.has("before");
  const track = files.length > 1 && $("#search-track").checked;
  if (track) form.append("track", "mean");
  const status = $("#search-status");
  const results = $("#search-results");
  $("#search-submit").disabled = true;
  status.textContent = `Searching with ${files.length} ${files.length === 1 ? "crop" : "crops"}…`;
  results.setAttribute("aria-busy", "true");
  try {
    const answer = await postForm("/query", form);
    // One result per crop, or one for the whole track where the service ranks tracks.
    const perFile = answer.results.length === files.length;
    for (const url of queryURLs.splice(0)) URL.revokeObjectURL(url);
    results.replaceChildren(
      ...answer.results.map((result, index) => resultSection(result, perFile ? [files[index]] : files, index, filtered)),
    );
    status.textContent = "";
  } catch (error) {
    status.textContent = "";
    showError(error);
  } finally {
    $("#search-submit").disabled = false;
    results.setAttribute("aria-busy", "false");
  }
});

// -- start ------------------------------------------------------------------------------------------

async function refreshAll() {
  await Promise.all([loadHealth(), loadGallery(), $("#view-people").hidden ? null : people.refresh()]);
  if (gallery.identity) await openIdentity(gallery.identity);
}

async function start() {
  await loadHealth();
  try {
    await getJSON("/identities", { limit: 1 });
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      storeKey(null);
      await askForKey(""); // the key form's submit refreshes everything
      document.body.dataset.ready = "true";
      return;
    }
  }
  if (storedKey()) $("#key-button").hidden = false;
  await loadGallery();
  document.body.dataset.ready = "true";
}

start();
