// The operator's review of the people the service grouped from sightings (docs/API.md: POST /sightings,
// /people): the list by size or by recency, one person's timeline per camera, and the decisions (name, merge,
// split, not a person), each followed by a fresh list and person. Crops come through the page's cropImage.

import { getJSON, postJSON } from "./api.js";
import { formatTime, h, localInputToISO } from "./dom.js";

const PEOPLE_PAGE = 24; // people per page
const VISIT_SHOWN = 24; // crops of one visit shown before "Show all"
const STATUS_NAMES = { provisional: "Provisional", named: "Named", ignored: "Not a person", merged: "Merged" };

function plural(count, one, many) {
  return `${count} ${count === 1 ? one : many}`;
}

// What a person is called on the page: the name once named, else its number (its identity is unknown-<id>).
export function personTitle(person) {
  return person.status === "named" ? person.identity : `Person ${person.id}`;
}

function cameraName(camera) {
  return camera === null || camera === undefined || camera === "" ? "no camera" : camera;
}

function timeRange(first, last) {
  if (!first) return "";
  const start = formatTime(first);
  const end = formatTime(last);
  return start === end ? start : `${start} – ${end}`;
}

export function createPeopleView({ cropImage, showError, clearError }) {
  const $ = (selector) => document.querySelector(selector);
  const state = {
    offset: 0,
    total: 0,
    status: "provisional",
    order: "size",
    page: [], // the people listed now
    open: null, // the open person's timeline (GET /people/{id})
    selected: new Set(), // entry ids chosen for a split
    expanded: new Set(), // visits (by their first entry) shown whole
    busy: false, // a decision is on its way
    picking: false, // choosing, in the list, the person to merge the open one into
    fresh: null, // the person a split just made, marked in the list
    listSeq: 0, // only the latest answer of overlapping loads is shown
    personSeq: 0,
  };

  // -- the list -------------------------------------------------------------------------------------

  function personCard(person) {
    const title = personTitle(person);
    const own = state.open && state.open.person.id === person.id;
    const label = state.picking
      ? `Merge ${personTitle(state.open.person)} into ${title}`
      : `Open ${title}: ${plural(person.sightings, "sighting", "sightings")}`;
    const thumbnails = person.cameras.length
      ? person.cameras.map((seen) =>
          h(
            "figure",
            { class: "person-thumb", "data-camera": cameraName(seen.camera) },
            cropImage(seen.thumbnail, `${title} on camera ${cameraName(seen.camera)}`),
            h("figcaption", {}, cameraName(seen.camera)),
          ),
        )
      : [h("span", { class: "crop placeholder" })];
    return h(
      "li",
      {
        class: `person-card${own ? " is-open" : ""}${state.fresh === person.id ? " is-fresh" : ""}`,
        "data-person": person.id,
        "data-status": person.status,
        "data-sightings": person.sightings,
      },
      h(
        "button",
        {
          type: "button",
          class: "card-button person-button",
          "aria-label": label,
          "aria-current": own && !state.picking ? "true" : null,
          disabled: state.picking && own,
          onclick: () => (state.picking ? mergeInto(person.id) : openPerson(person.id)),
        },
        h("span", { class: "person-thumbs" }, thumbnails),
        h("span", { class: "identity-name person-name" }, title),
        person.status === "provisional" ? null : h("span", { class: `badge status-${person.status}` }, STATUS_NAMES[person.status]),
        h(
          "span",
          { class: "muted person-facts" },
          `${plural(person.sightings, "sighting", "sightings")} · ${plural(person.tracks, "track", "tracks")}`,
        ),
        person.last_seen ? h("span", { class: "muted person-seen" }, `last seen ${formatTime(person.last_seen)}`) : null,
      ),
    );
  }

  function renderList() {
    $("#people-list").replaceChildren(...state.page.map(personCard));
    $("#people-list").classList.toggle("picking", state.picking);
  }

  async function loadList() {
    const seq = ++state.listSeq;
    let answer;
    try {
      answer = await getJSON("/people", {
        status: state.status || undefined,
        order: state.order,
        offset: state.offset,
        limit: PEOPLE_PAGE,
      });
    } catch (error) {
      if (seq === state.listSeq) showError(error);
      return;
    }
    if (seq !== state.listSeq) return; // a later load (a toggle, a decision) answers instead
    const header = answer.headers.get("X-Total-Count");
    state.total = header === null ? answer.body.length : Number(header);
    if (!answer.body.length && state.offset > 0) {
      state.offset = Math.max(0, state.offset - PEOPLE_PAGE); // the last page emptied: step back
      return loadList();
    }
    state.page = answer.body.slice(0, PEOPLE_PAGE);
    renderList();
    const first = state.page.length ? state.offset + 1 : 0;
    const last = state.offset + state.page.length;
    const which = state.status ? `${STATUS_NAMES[state.status].toLowerCase()} ` : "";
    $("#people-total").textContent = `${state.total} ${which}${state.total === 1 ? "person" : "people"}`;
    $("#people-range").textContent = state.total ? `${first}–${last} of ${state.total}` : "";
    $("#people-prev").disabled = state.offset === 0;
    $("#people-next").disabled = last >= state.total;
    $("#people-empty").hidden = state.total > 0;
  }

  // -- the counter ------------------------------------------------------------------------------------

  async function loadCount() {
    const cameras = $("#people-count-cameras").value.split(",").map((camera) => camera.trim()).filter(Boolean);
    const after = localInputToISO($("#people-count-after").value);
    const before = localInputToISO($("#people-count-before").value);
    const params = new URLSearchParams();
    for (const camera of cameras) params.append("cameras", camera);
    if (after) params.append("after", after);
    if (before) params.append("before", before);
    const query = params.toString();
    let answer;
    try {
      answer = (await getJSON(`/people/count${query ? `?${query}` : ""}`)).body;
    } catch (error) {
      showError(error);
      return;
    }
    const where = cameras.length ? ` on ${cameras.join(", ")}` : "";
    const when = after || before ? " in this window" : "";
    const output = $("#people-seen");
    output.textContent = plural(answer.people, "person", "people");
    output.dataset.count = String(answer.people);
    $("#people-seen-scope").textContent = `seen${where}${when} (named or provisional, not ignored)`;
  }

  // -- one person -----------------------------------------------------------------------------------

  function sightingButton(entryId, camera, disabled) {
    const selected = state.selected.has(entryId);
    return h(
      "li",
      {},
      h(
        "button",
        {
          type: "button",
          class: "sighting",
          "data-entry": entryId,
          "aria-pressed": selected ? "true" : "false",
          "aria-label": `Sighting ${entryId} on camera ${cameraName(camera)}: select to split off`,
          disabled,
          onclick: (event) => toggleSighting(entryId, event.currentTarget),
        },
        cropImage(entryId, `Sighting ${entryId}`),
      ),
    );
  }

  function visitItem(visit, order, count, disabled) {
    const key = visit.entries[0];
    const whole = state.expanded.has(key) || visit.entries.length <= VISIT_SHOWN;
    const shown = whole ? visit.entries : visit.entries.slice(0, VISIT_SHOWN);
    return h(
      "li",
      { class: "visit", "data-camera": cameraName(visit.camera), "data-sightings": visit.sightings },
      h(
        "p",
        { class: "visit-when" },
        h("span", { class: "visit-order" }, `Visit ${order} of ${count}`),
        h("span", {}, timeRange(visit.first_seen, visit.last_seen)),
        h("span", { class: "muted" }, plural(visit.sightings, "sighting", "sightings")),
      ),
      h("ul", { class: "sightings", "aria-label": `Sightings of visit ${order}` }, shown.map((id) => sightingButton(id, visit.camera, disabled))),
      whole
        ? null
        : h(
            "button",
            {
              type: "button",
              class: "link",
              onclick: () => {
                state.expanded.add(key);
                renderPerson();
              },
            },
            `Show all ${visit.entries.length}`,
          ),
    );
  }

  // The visits by camera, cameras in the order the person first reached them; each visit keeps its place in time.
  function timelineLanes(visits, disabled) {
    const lanes = new Map();
    visits.forEach((visit, index) => {
      const camera = cameraName(visit.camera);
      if (!lanes.has(camera)) lanes.set(camera, []);
      lanes.get(camera).push([visit, index + 1]);
    });
    return [...lanes.entries()].map(([camera, items], lane) => {
      const sightings = items.reduce((sum, [visit]) => sum + visit.sightings, 0);
      const heading = `person-lane-${lane}`;
      return h(
        "section",
        { class: `camera-lane lane-${lane % 6}`, "data-camera": camera, "aria-labelledby": heading },
        h(
          "h4",
          { id: heading },
          `Camera ${camera}`,
          h("span", { class: "muted" }, ` · ${plural(items.length, "visit", "visits")} · ${plural(sightings, "sighting", "sightings")}`),
        ),
        h("ol", { class: "visits" }, items.map(([visit, order]) => visitItem(visit, order, visits.length, disabled))),
      );
    });
  }

  function renderPerson() {
    const detail = $("#person-detail");
    const timeline = state.open;
    if (!timeline) {
      detail.hidden = true;
      return;
    }
    const person = timeline.person;
    const merged = person.status === "merged";
    detail.dataset.person = String(person.id);
    detail.dataset.status = person.status;
    $("#person-heading").textContent = personTitle(person);
    const badge = $("#person-status-badge");
    badge.textContent = STATUS_NAMES[person.status];
    badge.className = `badge status-${person.status}`;
    const facts = [
      h("div", {}, h("dt", {}, "Identity"), h("dd", {}, person.identity)),
      h("div", {}, h("dt", {}, "Sightings"), h("dd", { id: "person-sightings" }, String(person.sightings))),
      h("div", {}, h("dt", {}, "Tracks"), h("dd", {}, String(person.tracks))),
      h("div", {}, h("dt", {}, "Seen"), h("dd", {}, timeRange(person.first_seen, person.last_seen) || "—")),
      merged
        ? h(
            "div",
            {},
            h("dt", {}, "Merged into"),
            h("dd", {}, h("button", { type: "button", class: "link", onclick: () => openPerson(person.merged_into) }, `Person ${person.merged_into}`)),
          )
        : null,
    ];
    $("#person-facts").replaceChildren(...facts.filter(Boolean));
    // A merged person is a record of where its sightings went: nothing to decide on it any more.
    for (const id of ["#person-name-submit", "#person-merge-submit", "#person-merge-pick", "#person-ignore"]) $(id).disabled = merged;
    $("#person-name").disabled = merged;
    $("#person-merge-into").disabled = merged;
    $("#person-ignore").disabled = merged || person.status === "ignored";
    $("#person-route").replaceChildren(
      ...timeline.visits.map((visit, index) =>
        h("li", {}, h("span", { class: "route-camera" }, cameraName(visit.camera)), h("span", { class: "muted" }, ` ${formatTime(visit.first_seen)}`), index + 1 < timeline.visits.length ? " →" : ""),
      ),
    );
    $("#person-timeline").replaceChildren(...timelineLanes(timeline.visits, merged));
    $("#person-no-visits").hidden = timeline.visits.length > 0;
    updateSelection();
    detail.hidden = false;
  }

  function updateSelection() {
    const count = state.selected.size;
    const split = $("#person-split");
    split.disabled = count === 0 || !state.open || state.open.person.status === "merged";
    split.textContent = count ? `Split off ${plural(count, "sighting", "sightings")}` : "Split off selected";
    $("#person-clear-selection").hidden = count === 0;
  }

  function toggleSighting(entryId, button) {
    if (state.selected.has(entryId)) state.selected.delete(entryId);
    else state.selected.add(entryId);
    button.setAttribute("aria-pressed", state.selected.has(entryId) ? "true" : "false");
    updateSelection();
  }

  async function openPerson(personId, { keepSelection = false, quiet = false } = {}) {
    const seq = ++state.personSeq;
    let timeline;
    try {
      timeline = (await getJSON(`/people/${personId}`)).body;
    } catch (error) {
      if (seq === state.personSeq && !quiet) showError(error);
      return false;
    }
    if (seq !== state.personSeq) return false;
    const changed = !state.open || state.open.person.id !== timeline.person.id;
    if (changed || !keepSelection) state.selected.clear();
    if (changed) {
      state.expanded.clear();
      $("#person-name").value = timeline.person.status === "named" ? timeline.person.identity : "";
      $("#person-merge-into").value = "";
      $("#person-message").textContent = "";
    }
    // Keep only selected sightings the person still has.
    const entries = new Set(timeline.visits.flatMap((visit) => visit.entries));
    for (const id of [...state.selected]) if (!entries.has(id)) state.selected.delete(id);
    state.open = timeline;
    stopPicking();
    renderPerson();
    renderList(); // the open card is marked
    if (changed) $("#person-detail").scrollIntoView({ block: "nearest" });
    return true;
  }

  function closePerson() {
    state.open = null;
    state.selected.clear();
    stopPicking();
    renderPerson();
    renderList();
  }

  // -- decisions ----------------------------------------------------------------------------------------

  // One review decision on the open person; then the list, the counter and the person (``show``) afresh.
  async function decide(action, body, describe, show) {
    const person = state.open && state.open.person;
    if (!person || state.busy) return; // one decision at a time: a double click decides once
    clearError();
    $("#person-message").textContent = "";
    state.busy = true;
    $("#person-detail").setAttribute("aria-busy", "true");
    let answer;
    try {
      answer = await postJSON(`/people/${person.id}/${action}`, body);
    } catch (error) {
      showError(error); // 404 person_not_found, 409 invalid_decision: the service's own sentence
      await Promise.all([loadList(), openPerson(person.id, { keepSelection: true, quiet: true })]);
      return;
    } finally {
      state.busy = false;
      $("#person-detail").removeAttribute("aria-busy");
    }
    state.fresh = action === "split" ? answer.id : null;
    await openPerson(show(answer), { keepSelection: false });
    await Promise.all([loadList(), loadCount()]);
    $("#person-message").textContent = describe(answer); // opening another person clears it
  }

  function nameOpen(event) {
    event.preventDefault();
    const name = $("#person-name").value.trim();
    if (!name) {
      showError(new Error("Give the name this person has."));
      $("#person-name").focus();
      return;
    }
    const id = state.open.person.id;
    decide("name", { name }, (answer) => `Person ${id} is now ${answer.identity}.`, () => id);
  }

  function mergeInto(targetId) {
    const source = state.open && state.open.person;
    if (!source) return;
    stopPicking();
    decide(
      "merge",
      { into: targetId },
      (answer) => `${personTitle(source)} was merged into ${personTitle(answer)}: ${plural(answer.sightings, "sighting", "sightings")} now.`,
      (answer) => answer.id,
    );
  }

  function mergeTyped(event) {
    event.preventDefault();
    const value = $("#person-merge-into").value.trim();
    const target = Number(value);
    if (!value || !Number.isInteger(target) || target < 1) {
      showError(new Error("Give the number of the person to merge into, or pick one from the list."));
      $("#person-merge-into").focus();
      return;
    }
    mergeInto(target);
  }

  function startPicking() {
    if (!state.open) return;
    clearError();
    state.picking = true;
    $("#people-pick-text").textContent = `Choose, in the list, the person to merge ${personTitle(state.open.person)} into.`;
    $("#people-pick").hidden = false;
    renderList();
    const first = document.querySelector("#people-list button:not([disabled])");
    if (first) first.focus();
  }

  function stopPicking() {
    if (!state.picking) return;
    state.picking = false;
    $("#people-pick").hidden = true;
    renderList();
  }

  function splitSelected() {
    if (!state.open || !state.selected.size) return;
    const id = state.open.person.id;
    const entries = [...state.selected].sort((a, b) => a - b);
    decide(
      "split",
      { entries },
      (answer) => `${plural(answer.sightings, "sighting", "sightings")} moved to a new person, Person ${answer.id}.`,
      () => id,
    );
  }

  function ignoreOpen() {
    const title = personTitle(state.open.person);
    const id = state.open.person.id;
    decide("ignore", {}, () => `${title} is marked as not a person: kept apart and not counted.`, () => id);
  }

  // -- controls -----------------------------------------------------------------------------------------

  $("#people-status").addEventListener("change", (event) => {
    state.status = event.target.value;
    state.offset = 0;
    loadList();
  });
  for (const radio of document.querySelectorAll('#people-order input[name="people-order"]')) {
    radio.addEventListener("change", () => {
      if (!radio.checked) return;
      state.order = radio.value;
      state.offset = 0;
      loadList();
    });
  }
  $("#people-prev").addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - PEOPLE_PAGE);
    loadList();
  });
  $("#people-next").addEventListener("click", () => {
    state.offset += PEOPLE_PAGE;
    loadList();
  });
  $("#people-refresh").addEventListener("click", () => refresh());
  $("#people-counter").addEventListener("submit", (event) => {
    event.preventDefault();
    clearError();
    loadCount();
  });
  $("#person-close").addEventListener("click", closePerson);
  $("#person-name-form").addEventListener("submit", nameOpen);
  $("#person-merge-form").addEventListener("submit", mergeTyped);
  $("#person-merge-pick").addEventListener("click", startPicking);
  $("#people-pick-cancel").addEventListener("click", () => {
    stopPicking();
    $("#person-merge-pick").focus();
  });
  $("#person-split").addEventListener("click", splitSelected);
  $("#person-clear-selection").addEventListener("click", () => {
    state.selected.clear();
    for (const button of document.querySelectorAll("#person-timeline .sighting")) button.setAttribute("aria-pressed", "false");
    updateSelection();
    $("#person-split").focus();
  });
  $("#person-ignore").addEventListener("click", ignoreOpen);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.picking) {
      stopPicking();
      $("#person-merge-pick").focus();
    }
  });

  // The list, the counter and the open person afresh.
  async function refresh() {
    const open = state.open ? state.open.person.id : null;
    await Promise.all([loadList(), loadCount(), open ? openPerson(open, { keepSelection: true }) : null]);
  }

  return { refresh, openPerson };
}
