// The generation settings: read the form into a job request, and fill it back from one.

const $ = (id) => document.getElementById(id);

function numberOrNull(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

// The model the server had loaded when the page opened: a request names a model only when the
// picker moves away from it, so the server keeps choosing its own (e.g. the inpainting model).
let startingModel = null;

export function setStartingModel(name) {
  startingModel = name;
}

export function seedValue() {
  const seed = numberOrNull("seed");
  return seed === null || seed < 0 ? null : Math.trunc(seed);
}

function hiresSettings() {
  if (!$("hires").checked) return null;
  return {
    scale: Number($("hires-scale").value),
    strength: Number($("hires-strength").value),
    steps: numberOrNull("hires-steps") || null,
    upscaler: $("hires-upscaler").value,
  };
}

function loraSettings() {
  return [...$("lora-list").querySelectorAll("li[data-name]")].map((item) => ({
    name: item.dataset.name,
    weight: Number(item.dataset.weight),
  }));
}

// The fields every kind of job shares; the source panel adds the image-specific ones.
export function readSettings() {
  const model = $("model").value;
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    steps: Number($("steps").value),
    guidance_scale: Number($("cfg-scale").value),
    seed: seedValue(),
    width: numberOrNull("width"),
    height: numberOrNull("height"),
    batch_size: Number($("batch-size").value),
    sampler: $("sampler").value,
    schedule_type: $("schedule-type").value || null,
    clip_skip: Number($("clip-skip").value),
    self_attention_scale: Number($("self-attention-scale").value),
    model: model && model !== startingModel ? model : null,
    loras: loraSettings(),
    hires: hiresSettings(),
    preview: $("preview").value,
  };
}

// The simple view's Size menu and the Advanced width/height fields show the same two numbers.
export function syncSizeFromFields() {
  const width = $("width").value.trim();
  const height = $("height").value.trim();
  const size = $("size");
  if (!width && !height) {
    size.value = "";
    return;
  }
  const value = `${width}x${height}`;
  const known = [...size.options].some((option) => option.value === value);
  size.querySelector('option[value="custom"]').hidden = known;
  size.value = known ? value : "custom";
  if (!known) size.querySelector('option[value="custom"]').textContent = `Custom (${width} × ${height})`;
}

export function syncFieldsFromSize() {
  const value = $("size").value;
  if (value === "custom") return;
  const [width, height] = value ? value.split("x") : ["", ""];
  $("width").value = width;
  $("height").value = height;
  $("size").querySelector('option[value="custom"]').hidden = true;
}

// Matches an option by its value, its label, a sampler alias, or a model file's name without its extension
// (infotexts name models that way).
function selectIfKnown(select, value) {
  const names = (option) => [
    option.value, option.textContent, option.value.replace(/\.[^.]+$/, ""), ...(option.dataset.aliases || "").split(","),
  ];
  const match = [...select.options].find((option) => names(option).includes(String(value)));
  if (match) select.value = match.value;
  return Boolean(match);
}

// `settings` uses the request's names (prompt, steps, sampler, ...); fields that are absent are left as they are.
export function applySettings(settings) {
  const set = (id, value) => {
    if (value !== undefined && value !== null) $(id).value = value;
  };
  set("prompt", settings.prompt);
  set("negative-prompt", settings.negative_prompt);
  set("steps", settings.steps);
  set("cfg-scale", settings.guidance_scale);
  set("seed", settings.seed);
  set("clip-skip", settings.clip_skip);
  set("self-attention-scale", settings.self_attention_scale);
  set("batch-size", settings.batch_size);
  if (settings.sampler) selectIfKnown($("sampler"), settings.sampler);
  if (settings.schedule_type) selectIfKnown($("schedule-type"), settings.schedule_type);
  if (settings.model) selectIfKnown($("model"), settings.model);
  if (settings.width && settings.height) {
    $("width").value = settings.width;
    $("height").value = settings.height;
    syncSizeFromFields();
  }
  if (settings.hires !== undefined) {
    $("hires").checked = Boolean(settings.hires);
    $("hires").dispatchEvent(new Event("change"));
  }
  if (settings.hires) {
    set("hires-scale", settings.hires.scale);
    set("hires-strength", settings.hires.strength);
    set("hires-steps", settings.hires.steps);
    if (settings.hires.upscaler) selectIfKnown($("hires-upscaler"), settings.hires.upscaler);
  }
  if (settings.strength !== undefined && settings.strength !== null) {
    $("strength").value = settings.strength;
    $("strength").dispatchEvent(new Event("input"));
  }
}

// The web UI's infotext names ("Steps", "CFG scale", "Size": "512x512", ...) as request settings.
export function settingsFromInfotext(fields) {
  const number = (key) => (fields[key] !== undefined && fields[key] !== "" ? Number(fields[key]) : undefined);
  const settings = {
    prompt: fields["Prompt"],
    negative_prompt: fields["Negative prompt"],
    steps: number("Steps"),
    guidance_scale: number("CFG scale"),
    seed: number("Seed"),
    sampler: fields["Sampler"],
    schedule_type: fields["Schedule type"],
    clip_skip: number("Clip skip"),
    self_attention_scale: number("Self-attention scale") ?? 1, // absent: the network as trained
    model: fields["Model"],
    strength: number("Denoising strength"),
  };
  if (fields["Size"]) {
    const [width, height] = String(fields["Size"]).split("x").map(Number);
    if (width && height) Object.assign(settings, { width, height });
  }
  settings.hires = null;
  if (fields["Hires upscale"]) {
    settings.hires = {
      scale: number("Hires upscale"),
      strength: number("Denoising strength"),
      steps: number("Hires steps"),
      upscaler: fields["Hires upscaler"],
    };
    delete settings.strength;
  }
  return settings;
}
