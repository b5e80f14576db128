// The service's HTTP API as the page uses it: the key as a header (never in a URL), problem+json errors
// turned into their human message, images fetched with the header and shown as blob: URLs.

const KEY_STORAGE = "reid-api-key";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function headers() {
  const key = storedKey();
  return key ? { "X-API-Key": key } : {};
}

// An RFC 9457 problem's `detail` is written for people; anything else gets a plain sentence.
async function problemOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's page or an empty body
  }
  if (body && typeof body.detail === "string") {
    return new ApiError(response.status, body.code || "", body.detail);
  }
  const reason = response.statusText ? ` (${response.statusText})` : "";
  return new ApiError(response.status, "", `The service answered ${response.status}${reason}.`);
}

// The API lives where the page does: "/" for "/ui", "/reid/" behind a proxy that serves it at "/reid/ui".
const BASE = new URL(".", document.baseURI);

function url(path, params) {
  const target = new URL(path.replace(/^\//, ""), BASE);
  for (const [name, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") target.searchParams.append(name, String(value));
  }
  return target.href;
}

async function send(path, { method = "GET", params, body, type } = {}) {
  let response;
  try {
    const sent = type ? { ...headers(), "Content-Type": type } : headers();
    response = await fetch(url(path, params), { method, body, headers: sent, cache: "no-store" });
  } catch {
    throw new ApiError(0, "network", "The service cannot be reached: is it running?");
  }
  if (!response.ok) throw await problemOf(response);
  return response;
}

export async function getJSON(path, params) {
  const response = await send(path, { params });
  return { body: await response.json(), headers: response.headers };
}

export async function deleteJSON(path) {
  return (await send(path, { method: "DELETE" })).json();
}

export async function postForm(path, form, params) {
  return (await send(path, { method: "POST", body: form, params })).json();
}

// A JSON body (the review decisions: POST /people/{id}/name, ...) and its JSON answer.
export async function postJSON(path, value) {
  return (await send(path, { method: "POST", body: JSON.stringify(value ?? {}), type: "application/json" })).json();
}

// A PNG (or any image) answer as an object URL; the caller revokes it when the picture goes.
export async function imageURL(path, { method = "GET", params, body } = {}) {
  const response = await send(path, { method, params, body });
  return URL.createObjectURL(await response.blob());
}

// A multipart POST with upload progress (fetch reports none): onProgress(sentBytes, totalBytes).
export function postFormWithProgress(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url(path));
    for (const [name, value] of Object.entries(headers())) xhr.setRequestHeader(name, value);
    xhr.responseType = "text";
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    xhr.addEventListener("load", async () => {
      const response = new Response(xhr.responseText, { status: xhr.status, statusText: xhr.statusText });
      if (xhr.status >= 200 && xhr.status < 300) resolve(await response.json());
      else reject(await problemOf(response));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network", "The upload failed: the connection was lost.")));
    xhr.send(form);
  });
}
