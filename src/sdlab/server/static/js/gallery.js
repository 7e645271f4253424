// Every result of this session, each with the parameters that made it; one is shown large.

import { imageUrl } from "./api.js";

const $ = (id) => document.getElementById(id);

const items = []; // {image: base64, infotext, seed, settings: the request that made it}
let selected = null;

export const selectedItem = () => selected;

// The large picture: a live preview while a job runs, else the selected result.
export function showPicture(base64, label) {
  const picture = $("picture");
  picture.src = imageUrl(base64);
  picture.alt = label;
  picture.hidden = false;
  $("picture-empty").hidden = true;
}

export function select(item) {
  selected = item;
  showPicture(item.image, `Result: ${item.settings.prompt || "no prompt"}, seed ${item.seed}`);
  $("infotext").textContent = item.infotext || "";
  $("download").href = imageUrl(item.image);
  $("download").download = `sdlab-${item.seed ?? "image"}.png`;
  $("picture-info").hidden = false;
  $("picture-info").dispatchEvent(new CustomEvent("picture-selected", { detail: item }));
  for (const button of $("gallery").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(button.dataset.index === String(items.indexOf(item))));
  }
}

function thumbnail(item, index) {
  const entry = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.dataset.index = String(index);
  button.setAttribute("aria-pressed", "false");
  button.setAttribute("aria-label", `Picture ${index + 1}, seed ${item.seed}`);
  const image = document.createElement("img");
  image.src = imageUrl(item.image);
  image.alt = "";
  button.append(image);
  button.addEventListener("click", () => select(item));
  entry.append(button);
  return entry;
}

// Adds a finished job's pictures (newest first) and shows the first of them.
export function addResults(result, settings) {
  const gallery = $("gallery");
  gallery.querySelector(".empty")?.remove();
  const added = (result.images || []).map((image, i) => ({
    image,
    infotext: (result.infotexts || [])[i] || "",
    seed: (result.seeds || [])[i] ?? null,
    settings,
  }));
  for (const item of added) {
    items.push(item);
    gallery.prepend(thumbnail(item, items.length - 1));
  }
  if (added.length) select(added[0]);
  return added;
}

export function setupGallery() {
  const empty = document.createElement("li");
  empty.className = "empty";
  empty.textContent = "Finished pictures collect here, each with its parameters.";
  $("gallery").append(empty);
}
