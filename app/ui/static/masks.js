// The attention-mask viewer: a crop beside its generated mask, the heat-map overlay and the paper's hidden
// view (figure 1 of the paper), for an enrolled entry or an uploaded query crop.

import { imageURL } from "./api.js";
import { h } from "./dom.js";

export const VIEWS = [
  ["crop", "Crop"],
  ["mask", "Mask"],
  ["overlay", "Heat-map overlay"],
  ["hidden", "Most important hidden"],
];

// Where the four pictures come from.
export function entrySource(entry) {
  return {
    title: `Entry ${entry.id} (${entry.identity})`,
    load: (view) =>
      view === "crop"
        ? imageURL(`/gallery/${entry.id}/image`)
        : imageURL(`/mask/${entry.id}`, { params: { view } }),
  };
}

export function uploadSource(file) {
  return {
    title: `Query crop ${file.name}`,
    load: (view) => {
      if (view === "crop") return Promise.resolve(URL.createObjectURL(file));
      const form = new FormData();
      form.append("file", file, file.name);
      return imageURL("/mask", { method: "POST", params: { view }, body: form });
    },
  };
}

export function createMaskViewer(dialog) {
  const heading = dialog.querySelector("#mask-heading");
  const message = dialog.querySelector("#mask-message");
  const focusImage = dialog.querySelector("#mask-focus-image");
  const focusCaption = dialog.querySelector("#mask-focus-caption");
  const strip = dialog.querySelector("#mask-strip");
  const radios = [...dialog.querySelectorAll('input[name="mask-view"]')];
  let urls = new Map(); // view -> object URL of the open source
  let generation = 0; // a newer open() makes the loads of an older one moot

  function show(view) {
    const url = urls.get(view);
    const label = VIEWS.find(([name]) => name === view)[1];
    focusImage.alt = `${label} of ${heading.textContent}`;
    focusCaption.textContent = label;
    if (url) focusImage.src = url;
    else focusImage.removeAttribute("src");
    focusImage.dataset.view = url ? view : "";
    for (const figure of strip.children) figure.classList.toggle("selected", figure.dataset.view === view);
  }

  function release() {
    generation += 1;
    for (const url of urls.values()) URL.revokeObjectURL(url);
    urls = new Map();
    strip.replaceChildren();
    focusImage.removeAttribute("src");
    delete dialog.dataset.loaded;
  }

  for (const radio of radios) radio.addEventListener("change", () => radio.checked && show(radio.value));
  dialog.querySelector("#mask-close").addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", release);

  return {
    async open(source) {
      release();
      const mine = generation;
      heading.textContent = source.title;
      message.hidden = true;
      for (const radio of radios) {
        radio.disabled = false;
        radio.checked = radio.value === "crop";
      }
      const figures = new Map();
      for (const [view, label] of VIEWS) {
        const image = h("img", { alt: `${label} of ${source.title}` });
        const figure = h("figure", { "data-view": view, "aria-busy": "true" }, image, h("figcaption", {}, label));
        figures.set(view, figure);
        strip.append(figure);
      }
      show("crop");
      if (!dialog.open) dialog.showModal();
      // One request per view, one after another: a masks request runs a network pass on the server.
      for (const [view] of VIEWS) {
        let url;
        try {
          url = await source.load(view);
        } catch (error) {
          if (mine !== generation) return;
          figures.get(view).setAttribute("aria-busy", "false");
          figures.get(view).classList.add("unavailable");
          for (const radio of radios) if (radio.value === view) radio.disabled = true;
          message.textContent = error.message;
          message.hidden = false;
          continue;
        }
        if (mine !== generation) {
          URL.revokeObjectURL(url);
          return;
        }
        urls.set(view, url);
        const figure = figures.get(view);
        figure.querySelector("img").src = url;
        figure.setAttribute("aria-busy", "false");
        const selected = radios.find((radio) => radio.checked);
        if (selected && selected.value === view) show(view);
      }
      dialog.dataset.loaded = "true";
    },
  };
}
