// One generation job: submit it, follow its events (place in the queue, steps, live preview), and
// hand its pictures to the gallery. The Interrupt button ends it early; the server returns what it has.

import { cancelJob, submitJob, watchJob } from "./api.js";
import { addResults, showPicture } from "./gallery.js";

const $ = (id) => document.getElementById(id);

let running = null; // {id, stop}

export function showMessage(text, kind = "error") {
  const message = $("message");
  message.textContent = text;
  message.className = kind === "error" ? "message" : "message info";
  message.hidden = !text;
}

function setStatus(text, progress) {
  $("status").textContent = text;
  const bar = $("progress");
  if (progress === null) bar.removeAttribute("value");
  else bar.value = progress;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("interrupt").disabled = !busy;
  $("progress").setAttribute("aria-busy", String(busy));
}

function finish(status, progress) {
  running = null;
  setBusy(false);
  setStatus(status, progress);
}

export async function startJob(body) {
  showMessage("");
  setBusy(true);
  setStatus("Sending…", null);
  let job;
  try {
    job = await submitJob(body);
  } catch (error) {
    finish("Ready", 0);
    showMessage(error.message);
    return;
  }
  const settings = { ...body, init_image: undefined, mask: undefined };
  running = { id: job.id, stop: null };
  setStatus(job.position > 0 ? `Waiting: ${job.position} ahead in the queue` : "Starting…", null);
  running.stop = watchJob(job.id, {
    queued: ({ position }) => setStatus(position > 0 ? `Waiting: ${position} ahead in the queue` : "Starting…", null),
    started: () => setStatus("Starting…", 0),
    progress: ({ step, steps, progress, preview }) => {
      setStatus(`Step ${step} of ${steps}`, progress);
      if (preview) showPicture(preview, "Live preview");
    },
    done: (result) => {
      const pictures = addResults(result, settings);
      const interrupted = result.interrupted === true || result.state === "interrupted";
      finish(interrupted ? "Interrupted" : `Done: ${pictures.length} picture${pictures.length === 1 ? "" : "s"}`, 1);
    },
    failed: ({ error }) => {
      finish("Failed", 0);
      showMessage(error || "The job failed.");
    },
    cancelled: () => finish("Interrupted", 0),
  });
}

export async function interruptJob() {
  if (!running) return;
  setStatus("Interrupting…", null);
  try {
    await cancelJob(running.id);
  } catch (error) {
    showMessage(error.message);
  }
}
