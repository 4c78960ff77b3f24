// Reading the admin API's JSON: node names, active loads, memory budgets, replica names.

import { h } from "./dom.js";

/** Replica states that hold memory on their node (the server's ACTIVE_REPLICA_STATES). */
export const ACTIVE_STATES = ["scheduled", "staging", "loading", "loaded"];

/** id → node, to show names where the API gives ids. */
export function byId(nodes) {
  return new Map(nodes.map((n) => [n.id, n]));
}

/** A node's name (with its id as tooltip), or its id when the node is unknown. */
export function nodeName(id, nodes) {
  const node = nodes.get(id);
  if (!id) return h("span", { class: "muted" }, "—");
  return node ? h("span", { title: id }, node.name) : h("span", { class: "mono" }, id);
}

/** `text` with every node id in it replaced by the node's name (event messages name ids). */
export function withNames(text, nodes) {
  let out = String(text ?? "");
  for (const [id, node] of nodes) {
    if (!id || !out.includes(id)) continue;
    out = out.split(`${node.name} (${id})`).join(node.name).split(id).join(node.name);
  }
  return out;
}

export function replicaName(r) {
  return `${r.model}#${r.index}`;
}

/**
 * Loads in progress from GET /api/loads: each claimed job, with the newest progress event
 * of its model when there is one; progress events without a job (another frontend's) too.
 */
export function activeLoads(loads) {
  const out = new Map();
  for (const job of loads.jobs || []) out.set(job.model, { ...job });
  for (const [model, p] of Object.entries(loads.progress || {})) {
    const job = out.get(model);
    if (job) {
      out.set(model, { ...job, ...dropNulls(p), elapsed: job.elapsed });
    } else if (!["loaded", "failed"].includes(p.state)) {
      out.set(model, { ...p });
    }
  }
  return [...out.values()].sort((a, b) => a.model.localeCompare(b.model));
}

function dropNulls(o) {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== null && v !== undefined));
}

/** The bytes Corral may fill on a node: {ram, vram} from its budget ("80%" or "12.0 GB"). */
export function budgetBytes(node) {
  const r = node.resources || {};
  const vramTotal = (r.gpus || []).reduce((s, g) => s + (g.memory_total || 0), 0);
  const text = String(node.memory_budget || "");
  if (text.endsWith("%")) {
    const fraction = parseFloat(text) / 100;
    return { ram: (r.ram_total || 0) * fraction, vram: vramTotal * fraction };
  }
  const size = parseSize(text);
  return { ram: size ?? 0, vram: vramTotal ? (size ?? 0) : 0 };
}

const UNITS = {
  B: 1,
  KB: 1e3,
  MB: 1e6,
  GB: 1e9,
  TB: 1e12,
  KIB: 1024,
  MIB: 1024 ** 2,
  GIB: 1024 ** 3,
  TIB: 1024 ** 4,
};

function parseSize(text) {
  const m = /^\s*([\d.]+)\s*([a-z]*)\s*$/i.exec(text);
  if (!m) return null;
  const unit = UNITS[(m[2] || "B").toUpperCase()];
  return unit ? parseFloat(m[1]) * unit : null;
}

/** Bytes the active replicas on `nodeId` reserve. */
export function reserved(nodeId, replicas) {
  return replicas
    .filter((r) => r.node_id === nodeId && ACTIVE_STATES.includes(r.state))
    .reduce((s, r) => s + (r.memory || 0), 0);
}
