// The menus the server fills: models, samplers, schedule types, LoRAs and embeddings.

import { listEmbeddings, listLoras, listModels, listSamplers, listSchedules } from "./api.js";

const $ = (id) => document.getElementById(id);

function option(value, label) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = label;
  return element;
}

function fillModels(models) {
  const select = $("model");
  select.replaceChildren(...models.map((model) => option(model.name, model.title || model.name)));
  const current = models.find((model) => model.current);
  if (current) select.value = current.name;
  return current ? current.name : null;
}

function fillSamplers(samplers) {
  const select = $("sampler");
  const chosen = select.value;
  select.replaceChildren(
    ...samplers.map((sampler) => {
      const element = option(sampler.name, sampler.name);
      element.dataset.aliases = (sampler.aliases || []).join(",");
      return element;
    }),
  );
  if ([...select.options].some((element) => element.value === chosen)) select.value = chosen;
}

function fillSchedules(schedules) {
  const select = $("schedule-type");
  select.replaceChildren(option("", "Automatic"), ...schedules.map((schedule) => option(schedule.name, schedule.label || schedule.name)));
}

function fillLoras(loras) {
  const select = $("lora-pick");
  select.replaceChildren(...loras.map((lora) => option(lora.name, lora.name)));
  select.disabled = $("lora-add").disabled = loras.length === 0;
  if (loras.length === 0) select.replaceChildren(option("", "none in the models folder"));
}

function emptyItem(text) {
  const item = document.createElement("li");
  item.className = "empty";
  item.textContent = text;
  return item;
}

function insertIntoPrompt(text) {
  const prompt = $("prompt");
  const before = prompt.value.trimEnd();
  prompt.value = before ? `${before}, ${text}` : text;
  prompt.focus();
}

function fillEmbeddings(embeddings) {
  const list = $("embedding-list");
  if (embeddings.length === 0) {
    list.replaceChildren(emptyItem("none in the models folder"));
    return;
  }
  list.replaceChildren(
    ...embeddings.map((embedding) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = embedding.name;
      button.setAttribute("aria-label", `Add embedding ${embedding.name} to the prompt`);
      button.addEventListener("click", () => insertIntoPrompt(embedding.name));
      item.append(button);
      return item;
    }),
  );
}

// One chip per LoRA in use; its data holds the name and weight the request sends.
export function addLora(name, weight) {
  const list = $("lora-list");
  list.querySelector(`li[data-name="${CSS.escape(name)}"]`)?.remove();
  list.querySelector("li.empty")?.remove();
  const item = document.createElement("li");
  item.dataset.name = name;
  item.dataset.weight = String(weight);
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "×";
  remove.setAttribute("aria-label", `Remove LoRA ${name}`);
  remove.addEventListener("click", () => {
    item.remove();
    if (!list.children.length) list.append(emptyItem("no LoRA"));
  });
  item.append(`${name} : ${weight}`, remove);
  list.append(item);
}

// Loads every menu; returns the name of the model the server has loaded now.
export async function loadChoices() {
  $("lora-list").replaceChildren(emptyItem("no LoRA"));
  const [models, samplers, schedules, loras, embeddings] = await Promise.all([
    listModels(), listSamplers(), listSchedules(), listLoras(), listEmbeddings(),
  ]);
  fillSamplers(samplers);
  fillSchedules(schedules);
  fillLoras(loras);
  fillEmbeddings(embeddings);
  return fillModels(models);
}
