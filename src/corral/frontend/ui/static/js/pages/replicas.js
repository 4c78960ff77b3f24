// Replicas: model#index, node, state, in-flight, last use, address; stop one.

import { seg } from "../api.js";
import { byId, nodeName, replicaName } from "../cluster.js";
import { ago, button, bytes, h, pill, table, when } from "../dom.js";

export default {
  title: "Replicas",

  async load(api) {
    const [replicas, nodes] = await Promise.all([api.get("/replicas"), api.get("/nodes")]);
    return { replicas: replicas.replicas, nodes: nodes.nodes };
  },

  render(data, ctx) {
    const nodes = byId(data.nodes);
    const rows = [...data.replicas].sort(
      (a, b) => a.model.localeCompare(b.model) || a.index - b.index,
    );
    const revisions = rows.some((r) => r.revision !== undefined);
    return table(
      "replicas",
      [
        { title: "Replica", cell: (r) => h("strong", {}, replicaName(r)) },
        { title: "Node", cell: (r) => nodeName(r.node_id, nodes) },
        { title: "State", cell: (r) => pill(r.state, r.load_error) },
        { title: "In flight", cell: (r) => String(r.inflight ?? "—") },
        {
          title: "Last used",
          cell: (r) => h("span", { title: when(r.last_used) }, ago(r.last_used)),
        },
        { title: "Address", cell: (r) => (r.address ? h("code", {}, r.address) : "—") },
        { title: "Memory", cell: (r) => bytes(r.memory) },
        revisions
          ? { title: "Revision", cell: (r) => h("code", {}, String(r.revision ?? "").slice(0, 12)) }
          : null,
        { title: "Error", class: "wrap", cell: (r) => r.load_error || "" },
        { title: "", class: "actions", cell: (r) => stop(r, ctx) },
      ].filter(Boolean),
      rows,
      { empty: "No replica: models load on their first request.", rowKey: replicaName },
    );
  },
};

function stop(replica, ctx) {
  if (replica.state === "unloading") return null;
  const name = replicaName(replica);
  return button(
    "Stop",
    () =>
      ctx.act(() => ctx.api.del(`/replicas/${seg(replica.model)}/${replica.index}`), {
        title: `Stop ${name}?`,
        message:
          "Its process stops now; requests in flight on it may fail. The model reloads on demand or to keep its minimum.",
        label: "Stop",
      }),
    "danger",
  );
}
