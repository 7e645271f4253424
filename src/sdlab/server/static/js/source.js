// The source image panel: img2img, inpaint, outpaint and upscale start from a picture shown here.

import { imageUrl } from "./api.js";
import { createMaskPainter } from "./mask.js";

const $ = (id) => document.getElementById(id);

const HINTS = {
  img2img: "The result keeps the source image's size.",
  inpaint: "Paint over the part to repaint; the rest of the picture stays as it is.",
  outpaint: "The canvas grows by these margins, and the new margins are painted.",
  upscale: "The x4 upscaler makes the picture four times as wide and high.",
};

let sourceImage = null; // base64 PNG, or null for text to image
let painter = null;

export function currentMode() {
  if (!sourceImage) return "txt2img";
  return document.querySelector('input[name="mode"]:checked').value;
}

function showMode() {
  const mode = currentMode();
  for (const element of document.querySelectorAll(".mode-only")) {
    element.hidden = !element.dataset.modes.split(" ").includes(mode);
  }
  $("mask-canvas").hidden = mode !== "inpaint";
  $("source-hint").textContent = HINTS[mode] || "";
}

// Shows `base64` as the source and switches to `mode`; the mask starts empty.
export function setSource(base64, mode) {
  sourceImage = base64;
  const image = $("source-image");
  image.onload = () => painter.reset(image.naturalWidth, image.naturalHeight);
  image.src = imageUrl(base64);
  document.querySelector(`input[name="mode"][value="${mode}"]`).checked = true;
  $("source").hidden = false;
  showMode();
}

export function clearSource() {
  sourceImage = null;
  $("source").hidden = true;
  $("source-image").removeAttribute("src");
}

// The request fields of the current mode; throws an Error with a message for the user.
export function readSourceFields() {
  const mode = currentMode();
  if (mode === "txt2img") return { kind: "txt2img" };
  const fields = { kind: mode, init_image: sourceImage, width: null, height: null, hires: null };
  if (mode !== "upscale") fields.strength = Number($("strength").value);
  if (mode === "inpaint") {
    if (painter.isEmpty()) throw new Error("Paint a mask over the part of the picture to repaint first.");
    fields.mask = painter.toBase64();
  }
  if (mode === "inpaint" || mode === "outpaint") {
    fields.mask_blur = Number($("mask-blur").value);
    fields.fill = $("fill").value;
  }
  if (mode === "outpaint") {
    fields.extend = Object.fromEntries(
      ["left", "right", "top", "bottom"].map((side) => [side, Number($(`extend-${side}`).value) || 0]),
    );
  }
  if (mode === "upscale") {
    fields.noise_level = Number($("noise-level").value);
    fields.batch_size = 1;
  }
  return fields;
}

export function setupSource() {
  painter = createMaskPainter($("mask-canvas"), { brushSize: $("brush-size"), eraser: $("eraser") });
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", showMode);
  $("mask-clear").addEventListener("click", () => painter.clear());
  $("mask-invert").addEventListener("click", () => painter.invert());
  $("source-close").addEventListener("click", clearSource);
  const strength = $("strength");
  strength.addEventListener("input", () => {
    $("strength-value").textContent = Number(strength.value).toFixed(2);
  });
}
