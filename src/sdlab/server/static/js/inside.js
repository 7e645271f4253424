// The "Inside" section: the selected picture's prompt, seed and settings run again as a trajectory,
// attention or edit job (the native API's views of the inside), shown under the picture.

import { imageUrl, submitJob, watchJob } from "./api.js";
import { selectedItem } from "./gallery.js";

const $ = (id) => document.getElementById(id);
const FRAME_MS = 400;

let running = false;
let animation = null; // the denoising steps' timer

function setInsideBusy(busy, text) {
  running = busy;
  for (const id of ["inside-steps", "inside-attention", "inside-edit"]) $(id).disabled = busy;
  $("inside-status").textContent = text;
}

function stopAnimation() {
  if (animation !== null) clearInterval(animation);
  animation = null;
}

function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function picture(base64, alt, caption) {
  return element("figure", {}, [element("img", { src: imageUrl(base64), alt }), element("figcaption", { text: caption })]);
}

// The job body: the request that made the picture, for one picture with its own seed.
function viewRequest(item, kind, extra) {
  const settings = item.settings;
  if (settings.kind && settings.kind !== "txt2img") {
    throw new Error(`The views of the inside redraw a picture made from text; this one came from ${settings.kind}.`);
  }
  if (settings.hires) throw new Error("The views of the inside redraw a picture without the hires fix; generate one without it.");
  const { prompt, negative_prompt, steps, guidance_scale, width, height, sampler, schedule_type, clip_skip, model, loras } = settings;
  return {
    kind, prompt, negative_prompt, steps, guidance_scale, width, height, sampler, schedule_type, clip_skip, model, loras,
    seed: item.seed, batch_size: 1, preview: "none", ...extra,
  };
}

function runView(kind, extra, show) {
  const item = selectedItem();
  if (!item || running) return;
  let body;
  try {
    body = viewRequest(item, kind, extra);
  } catch (error) {
    $("inside-status").textContent = error.message;
    return;
  }
  setInsideBusy(true, "Sending…");
  submitJob(body).then(
    (job) => {
      watchJob(job.id, {
        queued: ({ position }) => setInsideBusy(true, position > 0 ? `Waiting: ${position} ahead in the queue` : "Starting…"),
        started: () => setInsideBusy(true, "Starting…"),
        progress: ({ step, steps }) => setInsideBusy(true, `Step ${step} of ${steps}`),
        done: (result) => {
          if (!result.inside) {
            setInsideBusy(false, "Interrupted: no view to show.");
            return;
          }
          if (kind === "trajectory") stopAnimation();
          $(`inside-view-${kind}`).replaceChildren(show(result.inside, body));
          setInsideBusy(false, "Done.");
        },
        failed: ({ error }) => setInsideBusy(false, `Failed: ${error || "the job failed"}`),
        cancelled: () => setInsideBusy(false, "Cancelled."),
      });
    },
    (error) => setInsideBusy(false, `Failed: ${error.message}`),
  );
}

function showSteps({ trajectory }) {
  const frames = trajectory.frames;
  const label = (frame) => (frame.step === frame.total ? `done (${frame.total} steps)` : `step ${frame.step}`);
  const player = element("img", { src: imageUrl(frames[0].denoised), alt: `Predicted picture, ${label(frames[0])}` });
  const playerCaption = element("figcaption", { text: label(frames[0]) });
  const pause = element("button", { type: "button", id: "inside-pause", "aria-pressed": "false", text: "Pause" });
  let index = 0;
  const advance = () => {
    index = (index + 1) % frames.length;
    player.src = imageUrl(frames[index].denoised);
    player.alt = `Predicted picture, ${label(frames[index])}`;
    playerCaption.textContent = label(frames[index]);
  };
  animation = setInterval(advance, FRAME_MS);
  pause.addEventListener("click", () => {
    if (animation === null) {
      animation = setInterval(advance, FRAME_MS);
      pause.textContent = "Pause";
      pause.setAttribute("aria-pressed", "false");
    } else {
      stopAnimation();
      pause.textContent = "Play";
      pause.setAttribute("aria-pressed", "true");
    }
  });
  const strip = element("ol", { class: "frames", "aria-label": "Latents per step" }, frames.map((frame) =>
    element("li", {}, [picture(frame.noisy, `Latents at ${label(frame)}, decoded`, `${label(frame)}: latents`)])));
  const predicted = element("ol", { class: "frames", "aria-label": "Predicted clean pictures" }, frames.map((frame) =>
    element("li", {}, [picture(frame.denoised, `Predicted clean picture at ${label(frame)}`, `${label(frame)}: predicted`)])));
  return element("section", { "aria-label": "Denoising steps" }, [
    element("h3", { text: `Denoising steps (every ${trajectory.every})` }),
    element("div", { class: "animation" }, [element("figure", {}, [player, playerCaption]), pause]),
    strip, predicted,
  ]);
}

function showAttention({ attention }) {
  return element("section", { "aria-label": "Attention maps" }, [
    element("h3", { text: "Where each word was read" }),
    element("ul", { class: "word-maps", "aria-label": "Attention maps per word" }, attention.words.map(({ word, map }) =>
      element("li", {}, [picture(map, `Attention map of “${word}” over the picture`, word)]))),
  ]);
}

function showEdit({ edit }) {
  return element("section", { "aria-label": "Prompt edit" }, [
    element("h3", { text: `Edit, cross-attention steps ${edit.cross_steps}` }),
    element("ul", { class: "edit-pair", "aria-label": "Source and edit side by side" }, [
      element("li", {}, [picture(edit.source, `Source: ${edit.source_prompt}`, `source: ${edit.source_prompt}`)]),
      element("li", {}, [picture(edit.edit, `Edit: ${edit.target_prompt}`, `edit: ${edit.target_prompt}`)]),
    ]),
  ]);
}

// A newly selected picture: its prompt becomes the edit's starting point, and the old views go.
function pictureChanged(item) {
  stopAnimation();
  for (const view of $("inside-view").children) view.replaceChildren();
  if (!running) $("inside-status").textContent = "";
  $("edit-target").value = item ? item.settings.prompt || "" : "";
}

// About eight frames whatever the step count: enough to see the picture appear, few enough to read.
const frameInterval = (item) => Math.max(1, Math.round((item?.settings.steps || 20) / 8));

export function setupInside() {
  $("picture-info").addEventListener("picture-selected", (event) => pictureChanged(event.detail));
  $("inside-steps").addEventListener("click", () => runView("trajectory", { every: frameInterval(selectedItem()) }, showSteps));
  $("inside-attention").addEventListener("click", () => runView("attention", {}, showAttention));
  $("inside-edit").addEventListener("click", () => {
    const target = $("edit-target").value.trim();
    if (!target) {
      $("inside-status").textContent = "Type the target prompt: the picture's prompt with a word changed.";
      $("edit-target").focus();
      return;
    }
    runView("edit", { target_prompt: target, cross_steps: Number($("edit-cross").value) }, showEdit);
  });
  $("edit-cross").addEventListener("input", () => {
    $("edit-cross-value").textContent = $("edit-cross").value;
  });
}
