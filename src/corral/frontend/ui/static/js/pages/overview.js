// Overview: nodes by status, models, replicas by state, loads in progress, recent events.

import { activeLoads, byId, nodeName, withNames } from "../cluster.js";
import { ago, countPills, h, pill, progress, table, tally, when } from "../dom.js";

export default {
  title: "Overview",

  async load(api) {
    const [nodes, models, replicas, loads, events] = await Promise.all([
      api.get("/nodes"),
      api.get("/models"),
      api.get("/replicas"),
      api.get("/loads"),
      api.get("/events?limit=10"),
    ]);
    return {
      nodes: nodes.nodes,
      models: models.models,
      replicas: replicas.replicas,
      loads: activeLoads(loads),
      events: events.events,
    };
  },

  render(data) {
    const nodes = byId(data.nodes);
    const served = new Set(data.replicas.filter((r) => r.state === "loaded").map((r) => r.model));
    return h(
      "div",
      {},
      h(
        "div",
        { class: "grid" },
        stat("Nodes", data.nodes.length, countPills(tally(data.nodes, (n) => n.status)), "#/nodes"),
        stat(
          "Models",
          data.models.length,
          h("span", { class: "muted" }, `${served.size} served now`),
          "#/models",
        ),
        stat(
          "Replicas",
          data.replicas.length,
          countPills(tally(data.replicas, (r) => r.state)),
          "#/replicas",
        ),
        stat(
          "Requests in flight",
          data.replicas.reduce((s, r) => s + (r.inflight || 0), 0),
          h("span", { class: "muted" }, `${data.loads.length} loading`),
          null,
        ),
      ),
      h("h2", {}, "Loads in progress"),
      table(
        "loads",
        [
          { title: "Model", cell: (l) => l.model },
          { title: "State", cell: (l) => pill(l.state, l.error) },
          { title: "Progress", cell: (l) => progress(l.percent, l.phase) },
          { title: "Node", cell: (l) => nodeName(l.node_id, nodes) },
          {
            title: "Elapsed",
            cell: (l) => (l.elapsed !== undefined ? `${Math.round(l.elapsed)} s` : ""),
          },
          { title: "Error", class: "wrap", cell: (l) => l.error || "" },
        ],
        data.loads,
        { empty: "No model is loading." },
      ),
      h("h2", {}, h("a", { href: "#/events" }, "Recent events")),
      table(
        "events",
        [
          { title: "When", cell: (e) => h("span", { title: when(e.at) }, ago(e.at)) },
          { title: "Kind", cell: (e) => h("code", {}, e.kind) },
          { title: "Message", class: "wrap", cell: (e) => withNames(e.message, nodes) },
        ],
        data.events,
        { empty: "No events yet." },
      ),
    );
  },
};

function stat(title, value, detail, href) {
  const heading = href ? h("a", { href }, title) : title;
  return h(
    "div",
    { class: "card" },
    h("div", { class: "muted" }, heading),
    h("div", { class: "stat" }, String(value)),
    detail,
  );
}
