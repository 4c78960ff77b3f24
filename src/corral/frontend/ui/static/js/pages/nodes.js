// Nodes: status, labels, resources, memory budget and use, replicas, heartbeat; drain and labels.

import { seg } from "../api.js";
import { ACTIVE_STATES, budgetBytes, reserved } from "../cluster.js";
import { formDialog } from "../dialogs.js";
import {
  ago,
  button,
  bytes,
  chips,
  formatPairs,
  h,
  parsePairs,
  pill,
  table,
  when,
} from "../dom.js";

export default {
  title: "Nodes",

  async load(api) {
    const [nodes, replicas] = await Promise.all([api.get("/nodes"), api.get("/replicas")]);
    return { nodes: nodes.nodes, replicas: replicas.replicas };
  },

  render(data, ctx) {
    const nodes = [...data.nodes].sort((a, b) => a.name.localeCompare(b.name));
    return table(
      "nodes",
      [
        {
          title: "Name",
          cell: (n) => [
            h("strong", {}, n.name),
            h("div", { class: "muted small mono", title: n.id }, `${n.id.slice(0, 8)}…`),
          ],
        },
        { title: "Status", cell: (n) => pill(n.status) },
        { title: "Labels", cell: (n) => chips(n.labels) },
        { title: "Resources", cell: resources },
        { title: "Memory reserved", cell: (n) => memory(n, data.replicas) },
        { title: "Replicas", cell: (n) => replicaCount(n, data.replicas) },
        {
          title: "Heartbeat",
          cell: (n) => h("span", { title: when(n.last_heartbeat) }, ago(n.last_heartbeat)),
        },
        { title: "", class: "actions", cell: (n) => actions(n, ctx) },
      ],
      nodes,
      { empty: "No node has joined yet: start `corral worker --join URL`.", rowKey: (n) => n.name },
    );
  },
};

function resources(node) {
  const r = node.resources;
  const list = r.gpus || [];
  const free = list.reduce((s, g) => s + g.memory_free, 0);
  const total = list.reduce((s, g) => s + g.memory_total, 0);
  const names = [...new Set(list.map((g) => g.name))].join(", ");
  return [
    h(
      "span",
      { title: "RAM free / total" },
      `${r.cpu_count || "?"} CPU · ${bytes(r.ram_free)} / ${bytes(r.ram_total)}`,
    ),
    h(
      "div",
      { class: "muted small", title: names || null },
      list.length ? `${list.length}× ${names} · ${bytes(free)} / ${bytes(total)} VRAM` : "no GPU",
    ),
  ];
}

function memory(node, replicas) {
  const budget = budgetBytes(node);
  const limit = budget.ram + budget.vram;
  const used = reserved(node.id, replicas);
  const detail = `${node.memory_budget}: ${bytes(budget.ram)} RAM${budget.vram ? ` + ${bytes(budget.vram)} VRAM` : ""}`;
  return h(
    "span",
    { title: detail },
    limit > 0
      ? h("meter", { min: 0, max: limit, value: Math.min(used, limit), high: limit * 0.9 })
      : null,
    `${bytes(used)} of ${bytes(limit)}`,
    h("div", { class: "muted small" }, `budget ${node.memory_budget}`),
  );
}

function replicaCount(node, replicas) {
  const mine = replicas.filter((r) => r.node_id === node.id);
  const active = mine.filter((r) => ACTIVE_STATES.includes(r.state)).length;
  return mine.length === active ? String(active) : `${active} (+${mine.length - active})`;
}

function actions(node, ctx) {
  const path = `/nodes/${seg(node.id)}`;
  const drain =
    node.status === "draining"
      ? button("Undrain", () => ctx.act(() => ctx.api.post(`${path}/undrain`)))
      : button(
          "Drain",
          () =>
            ctx.act(() => ctx.api.post(`${path}/drain?wait=false`), {
              title: `Drain ${node.name}?`,
              message:
                "Its replicas move to other nodes first, then stop; it takes no new replicas until you undrain it.",
              label: "Drain",
            }),
          "danger",
        );
  return [drain, button("Labels", () => editLabels(node, ctx))];
}

function editLabels(node, ctx) {
  const text = h(
    "textarea",
    { id: "labels-text", name: "labels", spellcheck: "false" },
    formatPairs(node.labels),
  );
  return formDialog(
    `Labels of ${node.name}`,
    [
      h("label", { for: "labels-text" }, "One key=value per line"),
      text,
      h("p", { class: "muted small" }, "Saving replaces all of this node's labels."),
    ],
    async () => {
      const labels = parsePairs(text.value);
      await ctx.api.put(`/nodes/${seg(node.id)}/labels`, { labels });
      ctx.refresh();
    },
    { id: "labels" },
  );
}
