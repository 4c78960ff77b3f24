// DOM building and formatting helpers shared by every page; text is always set as text, never HTML.

import { serverNow } from "./api.js";

/** h("td", {class: "x", onclick: f}, "text", node, [more]) → an element. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      el.className = value;
    } else if (name in el && typeof value !== "string") {
      el[name] = value; // value, checked, disabled as properties
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

// --- formatting ------------------------------------------------------------------------------

/** "3 s ago" for an epoch-seconds timestamp (server clock); "never" for none. */
export function ago(seconds) {
  if (!seconds) return "never";
  const d = serverNow() - seconds;
  if (d < 1) return "just now";
  if (d < 60) return `${Math.floor(d)} s ago`;
  if (d < 3600) return `${Math.floor(d / 60)} min ago`;
  if (d < 86400) return `${Math.floor(d / 3600)} h ago`;
  return `${Math.floor(d / 86400)} d ago`;
}

/** A timestamp (epoch seconds or ISO text) as local date and time. */
export function when(value) {
  if (!value) return "";
  const ms = typeof value === "number" ? value * 1000 : Date.parse(value);
  return Number.isNaN(ms) ? String(value) : new Date(ms).toLocaleString();
}

/** Bytes in decimal units, like the server's format_size: "1.5 GB". */
export function bytes(n) {
  if (n === null || n === undefined) return "—";
  let size = Number(n);
  for (const unit of ["B", "KB", "MB", "GB", "TB"]) {
    if (Math.abs(size) < 1000 || unit === "TB") {
      return unit === "B" ? `${size.toFixed(0)} B` : `${size.toFixed(1)} ${unit}`;
    }
    size /= 1000;
  }
  return "";
}

export function count(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

// --- status pills, chips, meters -------------------------------------------------------------

const TONES = {
  ok: ["healthy", "loaded", "installed", "builtin", "ok"],
  info: [
    "scheduled",
    "staging",
    "loading",
    "placing",
    "evicting",
    "installing",
    "downloading",
    "resolving",
    "pending",
  ],
  warn: ["draining", "unhealthy", "unloading"],
  bad: ["failed", "offline"],
};

export function tone(status) {
  for (const [name, values] of Object.entries(TONES)) if (values.includes(status)) return name;
  return "";
}

/** A status pill coloured by `status`; `title` shows on hover, `label` replaces the text. */
export function pill(status, title, label) {
  return h("span", { class: `pill ${tone(status)}`, title: title || null }, label || status || "—");
}

/** Pills with counts, e.g. {loaded: 2, loading: 1}. */
export function countPills(counts) {
  const entries = Object.entries(counts).filter(([, n]) => n > 0);
  if (!entries.length) return h("span", { class: "muted" }, "none");
  return h(
    "span",
    { class: "counts" },
    entries.map(([s, n]) => pill(s, null, `${n} ${s}`)),
  );
}

export function tally(items, keyOf) {
  const out = {};
  for (const item of items) {
    const key = keyOf(item);
    out[key] = (out[key] || 0) + 1;
  }
  return out;
}

export function chips(mapping, empty = "—") {
  const entries = Object.entries(mapping || {});
  if (!entries.length) return h("span", { class: "muted" }, empty);
  return entries.map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`));
}

/** A progress bar with its percentage, or nothing when the percentage is unknown. */
export function progress(percent, label) {
  if (percent === null || percent === undefined) return label ? h("span", {}, label) : null;
  const value = Math.max(0, Math.min(100, Number(percent)));
  return h(
    "span",
    {},
    h("progress", { max: 100, value, "aria-label": label || "progress" }),
    `${value.toFixed(0)}%`,
    label ? ` ${label}` : "",
  );
}

export function button(label, onclick, kind = "") {
  return h("button", { type: "button", class: `button small ${kind}`, onclick }, label);
}

// --- tables ------------------------------------------------------------------------------------

/**
 * A table in its own scrolling box. columns: [{title, cell: row → content, class}].
 * `key` names the box so the app keeps its horizontal scroll across refreshes.
 */
export function table(key, columns, rows, { empty = "Nothing here yet.", rowKey } = {}) {
  if (!rows.length) {
    return h("div", { class: "table-wrap", "data-key": key }, h("div", { class: "empty" }, empty));
  }
  return h(
    "div",
    { class: "table-wrap", "data-key": key },
    h(
      "table",
      {},
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          columns.map((c) => h("th", { class: c.class || null }, c.title)),
        ),
      ),
      h(
        "tbody",
        {},
        rows.map((row) =>
          h(
            "tr",
            { "data-row": rowKey ? rowKey(row) : null },
            columns.map((c) => h("td", { class: c.class || null }, c.cell(row))),
          ),
        ),
      ),
    ),
  );
}

/** "key=value" lines → {key: value}; throws Error naming the bad line. */
export function parsePairs(text) {
  const out = {};
  for (const [i, raw] of text.split("\n").entries()) {
    const line = raw.trim();
    if (!line) continue;
    const at = line.indexOf("=");
    const key = at > 0 ? line.slice(0, at).trim() : "";
    if (!key) throw new Error(`line ${i + 1}: write key=value`);
    out[key] = line.slice(at + 1).trim();
  }
  return out;
}

export function formatPairs(mapping) {
  return Object.entries(mapping || {})
    .map(([k, v]) => `${k}=${v}`)
    .join("\n");
}
