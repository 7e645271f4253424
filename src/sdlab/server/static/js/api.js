// The native API (/api/v1, documented at /docs): JSON in and out, images as base64 PNG strings.

export class ApiError extends Error {}

// The server answers {"error", "detail"} for its own errors and FastAPI's {"detail": [...]} for
// request validation; either becomes one sentence a person can act on.
function errorMessage(status, body) {
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((item) => `${(item.loc || []).slice(1).join(".")}: ${item.msg}`).join("; ");
  }
  if (body && (body.detail || body.error)) {
    return [body.error, body.detail].filter(Boolean).join(": ");
  }
  return `the server answered ${status}`;
}

async function request(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError(errorMessage(response.status, data));
  return data;
}

export const listModels = () => request("GET", "/api/v1/models");
export const listSamplers = () => request("GET", "/api/v1/samplers");
export const listSchedules = () => request("GET", "/api/v1/schedules");
export const listLoras = () => request("GET", "/api/v1/loras");
export const listEmbeddings = () => request("GET", "/api/v1/embeddings");
export const readPngInfo = (image) => request("POST", "/api/v1/png-info", { image });
export const submitJob = (body) => request("POST", "/api/v1/jobs", body);
export const getJob = (id) => request("GET", `/api/v1/jobs/${encodeURIComponent(id)}`);
export const cancelJob = (id) => request("DELETE", `/api/v1/jobs/${encodeURIComponent(id)}`);

const FINAL_EVENTS = ["done", "failed", "cancelled"];

// Follows a job's server-sent events: handlers.queued/started/progress/done/failed/cancelled get
// each event's data. The stream ends after a final event; we close it first, since EventSource
// would otherwise reconnect. If the connection drops, the job's state is read once instead.
export function watchJob(id, handlers) {
  const source = new EventSource(`/api/v1/jobs/${encodeURIComponent(id)}/events`);
  let finished = false;
  const finish = (name, data) => {
    if (finished) return;
    finished = true;
    source.close();
    handlers[name](data);
  };
  for (const name of ["queued", "started", "progress"]) {
    source.addEventListener(name, (event) => {
      if (!finished) handlers[name](JSON.parse(event.data || "{}"));
    });
  }
  for (const name of FINAL_EVENTS) {
    source.addEventListener(name, (event) => finish(name, JSON.parse(event.data || "{}")));
  }
  source.onerror = async () => {
    if (finished) return;
    source.close();
    try {
      const job = await getJob(id);
      if (job.state === "done" || job.state === "interrupted") finish("done", job);
      else if (job.state === "failed") finish("failed", job);
      else if (job.state === "cancelled") finish("cancelled", job);
      else finish("failed", { error: "lost the connection to the server while the job was " + job.state });
    } catch (error) {
      finish("failed", { error: "lost the connection to the server" });
    }
  };
  return () => {
    finished = true;
    source.close();
  };
}

export const imageUrl = (base64) => `data:image/png;base64,${base64}`;

export function stripDataUrl(url) {
  const comma = url.indexOf(",");
  return url.startsWith("data:") && comma >= 0 ? url.slice(comma + 1) : url;
}

export function readFileAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(stripDataUrl(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
