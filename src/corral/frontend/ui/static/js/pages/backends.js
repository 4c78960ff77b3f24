// Backends: each node's backend installs with their progress; start an install.

import { seg } from "../api.js";
import { ago, button, h, pill, progress, table, when } from "../dom.js";

const INSTALLABLE = ["missing", "failed"];

export default {
  title: "Backends",

  async load(api) {
    const nodes = (await api.get("/nodes")).nodes.sort((a, b) => a.name.localeCompare(b.name));
    const answers = await Promise.allSettled(
      nodes.map((n) => api.get(`/nodes/${seg(n.id)}/backends`)),
    );
    return nodes.map((node, i) => {
      const a = answers[i];
      if (a.status === "rejected" && a.reason.unauthorized) throw a.reason;
      return a.status === "fulfilled"
        ? { node, backends: Object.entries(a.value.backends).map(([name, s]) => ({ name, ...s })) }
        : { node, error: a.reason.message };
    });
  },

  render(data, ctx) {
    if (!data.length) return h("p", { class: "muted" }, "No node has joined yet.");
    return h(
      "div",
      {},
      data.map(({ node, backends, error }) =>
        h(
          "section",
          { "data-node": node.name },
          h("h2", {}, node.name, " ", pill(node.status)),
          error
            ? h("div", { class: "banner error" }, error)
            : table(
                `backends-${node.id}`,
                [
                  { title: "Backend", cell: (b) => h("strong", {}, b.name) },
                  { title: "State", cell: (b) => pill(b.state, b.error) },
                  {
                    title: "Progress",
                    cell: (b) => progress(b.percent) || h("span", { class: "muted" }, "—"),
                  },
                  {
                    title: "Updated",
                    cell: (b) =>
                      b.updated_at
                        ? h("span", { title: when(b.updated_at) }, ago(b.updated_at))
                        : "—",
                  },
                  { title: "Error", class: "wrap", cell: (b) => b.error || "" },
                  { title: "", class: "actions", cell: (b) => install(node, b, ctx) },
                ],
                backends,
                { empty: "This node reports no backends." },
              ),
        ),
      ),
    );
  },
};

function install(node, backend, ctx) {
  if (!INSTALLABLE.includes(backend.state)) return null;
  const label = backend.state === "failed" ? "Retry install" : "Install";
  return button(label, () =>
    ctx.act(() => ctx.api.post(`/nodes/${seg(node.id)}/backends/${seg(backend.name)}/install`)),
  );
}
