// sdlab's page: wires the form, the source panel, the job runner, the gallery, the Inside views and PNG drops.
// Each part lives in its own module under /static/js/.

import { readFileAsBase64 } from "./js/api.js";
import { addLora, loadChoices } from "./js/choices.js";
import { setupDrop } from "./js/drop.js";
import { applySettings, readSettings, setStartingModel, syncFieldsFromSize, syncSizeFromFields } from "./js/form.js";
import { selectedItem, setupGallery } from "./js/gallery.js";
import { setupInside } from "./js/inside.js";
import { interruptJob, showMessage, startJob } from "./js/job.js";
import { readSourceFields, setSource, setupSource } from "./js/source.js";

const $ = (id) => document.getElementById(id);

function generate(event) {
  event.preventDefault();
  let body;
  try {
    body = { ...readSettings(), ...readSourceFields() };
  } catch (error) {
    showMessage(error.message);
    return;
  }
  startJob(body);
}

function sendSelected(mode) {
  const item = selectedItem();
  if (!item) return;
  setSource(item.image, mode);
  $("source").scrollIntoView({ block: "nearest" });
  $("source").querySelector(`input[name="mode"][value="${mode}"]`).focus();
}

function reuseSeed() {
  const item = selectedItem();
  if (item && item.seed !== null) $("seed").value = item.seed;
  else showMessage("Generate or select a picture first: its seed is re-used.", "info");
}

function wireForm() {
  $("generate-form").addEventListener("submit", generate);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate(event);
  });
  $("interrupt").addEventListener("click", interruptJob);
  $("size").addEventListener("change", syncFieldsFromSize);
  $("width").addEventListener("input", syncSizeFromFields);
  $("height").addEventListener("input", syncSizeFromFields);
  $("seed-random").addEventListener("click", () => {
    $("seed").value = -1;
  });
  $("seed-reuse").addEventListener("click", reuseSeed);
  $("hires").addEventListener("change", () => {
    $("hires-fields").hidden = !$("hires").checked;
  });
  $("hires-fields").hidden = true;
  $("lora-add").addEventListener("click", () => {
    if ($("lora-pick").value) addLora($("lora-pick").value, Number($("lora-weight").value));
  });
  $("open-image").addEventListener("change", async () => {
    const file = $("open-image").files[0];
    if (file) setSource(await readFileAsBase64(file), "img2img");
  });
}

function wireResults() {
  for (const button of document.querySelectorAll("[data-send]")) {
    button.addEventListener("click", () => sendSelected(button.dataset.send));
  }
  $("use-parameters").addEventListener("click", () => {
    const item = selectedItem();
    if (item) applySettings({ ...item.settings, seed: item.seed });
  });
}

async function main() {
  setupSource();
  setupGallery();
  setupInside();
  setupDrop();
  wireForm();
  wireResults();
  try {
    setStartingModel(await loadChoices());
  } catch (error) {
    showMessage(`Could not load the model and sampler lists: ${error.message}`);
  }
}

main();
