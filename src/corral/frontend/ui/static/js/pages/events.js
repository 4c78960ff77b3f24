// Events: the live audit log, newest first, with a text filter.

import { byId, withNames } from "../cluster.js";
import { ago, h, table, when } from "../dom.js";

const LIMIT = 200;

export default {
  title: "Events",

  toolbar(ctx) {
    return h("input", {
      id: "events-filter",
      type: "search",
      placeholder: "Filter by kind, subject or text",
      value: ctx.state.filter || "",
      "aria-label": "Filter events",
      oninput: (event) => {
        ctx.state.filter = event.target.value;
        ctx.rerender();
      },
    });
  },

  async load(api) {
    const [events, nodes] = await Promise.all([
      api.get(`/events?limit=${LIMIT}`),
      api.get("/nodes"),
    ]);
    return { events: events.events, nodes: nodes.nodes };
  },

  render(data, ctx) {
    const nodes = byId(data.nodes);
    const subject = (e) => nodes.get(e.subject)?.name || e.subject;
    const needle = (ctx.state.filter || "").trim().toLowerCase();
    const rows = data.events
      .map((e) => ({ ...e, text: withNames(e.message, nodes) }))
      .filter(
        (e) =>
          !needle ||
          [e.kind, e.subject, subject(e), e.message, e.text]
            .join(" ")
            .toLowerCase()
            .includes(needle),
      );
    return h(
      "div",
      {},
      table(
        "events",
        [
          { title: "When", cell: (e) => h("span", { title: when(e.at) }, ago(e.at)) },
          { title: "Kind", cell: (e) => h("code", {}, e.kind) },
          { title: "Subject", cell: (e) => subject(e) },
          { title: "Message", class: "wrap", cell: (e) => h("span", { title: e.message }, e.text) },
        ],
        rows,
        { empty: needle ? "No event matches the filter." : "No events yet." },
      ),
      h("p", { class: "muted small" }, `The newest ${LIMIT} events; live.`),
    );
  },
};
