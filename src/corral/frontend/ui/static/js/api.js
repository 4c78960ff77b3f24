// The admin API client: the stored credential, JSON in and out, OpenAI-style errors, the server clock.

const KEY = "corral.adminKey";

/** An answer other than 2xx, or no answer at all (status 0). */
export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || null;
  }
  get unauthorized() {
    return this.status === 401 || this.status === 403;
  }
}

/** The admin key for this tab only (sessionStorage). */
export const credential = {
  get() {
    try {
      return sessionStorage.getItem(KEY) || "";
    } catch {
      return "";
    }
  },
  set(value) {
    sessionStorage.setItem(KEY, value);
  },
  clear() {
    sessionStorage.removeItem(KEY);
  },
};

// The server's clock minus ours, in seconds, from the Date header: ages ("3 s ago") are
// computed against the clock that wrote the timestamps, not the browser's.
let clockOffset = 0;

export function serverNow() {
  return Date.now() / 1000 + clockOffset;
}

function noteClock(response) {
  const date = Date.parse(response.headers.get("date") || "");
  if (Number.isNaN(date)) return;
  const offset = date / 1000 + 0.5 - Date.now() / 1000; // Date has whole seconds
  clockOffset = Math.abs(offset) > 2 ? offset : 0;
}

// Relative to the page (/ui/), so a proxy that mounts Corral under a prefix keeps working.
function url(path) {
  return new URL("../api" + path, document.baseURI).toString();
}

/** One path segment of a URL, encoded; a model name may contain "/", kept as separators. */
export function seg(value) {
  return String(value).split("/").map(encodeURIComponent).join("/");
}

async function request(method, path, body) {
  const headers = { accept: "application/json" };
  const key = credential.get();
  if (key) headers.authorization = `Bearer ${key}`;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url(path), init);
  } catch (exc) {
    throw new ApiError(0, `Cannot reach the frontend (${exc.message}).`, "unreachable");
  }
  noteClock(response);
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = data && typeof data === "object" ? data.error : null;
    const message = (error && error.message) || `HTTP ${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message, error && error.code);
  }
  return data;
}

export const api = {
  get: (path) => request("GET", path),
  post: (path, body) => request("POST", path, body),
  put: (path, body) => request("PUT", path, body),
  patch: (path, body) => request("PATCH", path, body),
  del: (path) => request("DELETE", path),
};
