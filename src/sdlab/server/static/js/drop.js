// Dropping a PNG onto the page reads the generation parameters in its `parameters` text chunk
// back into the form (the server parses them, as the web UI's "PNG Info" does).

import { readFileAsBase64, readPngInfo } from "./api.js";
import { applySettings, settingsFromInfotext } from "./form.js";
import { showMessage } from "./job.js";
import { setSource } from "./source.js";

const $ = (id) => document.getElementById(id);

export async function readParameters(file) {
  const image = await readFileAsBase64(file);
  const info = await readPngInfo(image);
  if (!info.parameters) {
    showMessage(`${file.name} carries no generation parameters.`, "info");
    return;
  }
  applySettings(settingsFromInfotext(info.fields || {}));
  showMessage(`Read the parameters of ${file.name}.`, "info");
}

function hasFiles(event) {
  return [...(event.dataTransfer?.types || [])].includes("Files");
}

export function setupDrop() {
  const hint = $("drop-hint");
  let depth = 0; // dragenter/dragleave fire for every child element crossed
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    hint.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) hint.hidden = true;
  });
  document.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  document.addEventListener("drop", async (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    depth = 0;
    hint.hidden = true;
    const file = event.dataTransfer.files[0];
    if (!file) return;
    // onto the source panel: the picture becomes the source; anywhere else: its parameters
    const ontoSource = event.target.closest && event.target.closest("#source");
    try {
      if (ontoSource) setSource(await readFileAsBase64(file), document.querySelector('input[name="mode"]:checked').value);
      else if (file.type === "image/png" || file.name.toLowerCase().endsWith(".png")) await readParameters(file);
      else showMessage(`${file.name} is not a PNG; only PNGs carry parameters.`);
    } catch (error) {
      showMessage(error.message);
    }
  });
}
