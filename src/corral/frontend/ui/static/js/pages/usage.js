// Usage: requests and tokens per API key and model over a chosen window (GET /api/usage).

import { ApiError, serverNow } from "../api.js";
import { h, table } from "../dom.js";

const RANGES = [
  ["1 h", 3600],
  ["24 h", 86400],
  ["7 d", 7 * 86400],
  ["30 d", 30 * 86400],
];
const RECHECK_MS = 60000; // after a 404, ask again this much later, not every poll

export default {
  title: "Usage",

  toolbar(ctx) {
    ctx.state.range ||= 86400;
    return h(
      "label",
      { class: "inline" },
      "Window",
      h(
        "select",
        {
          id: "usage-range",
          onchange: (event) => {
            ctx.state.range = Number(event.target.value);
            ctx.refresh();
          },
        },
        RANGES.map(([label, seconds]) =>
          h(
            "option",
            { value: String(seconds), selected: seconds === ctx.state.range },
            `last ${label}`,
          ),
        ),
      ),
    );
  },

  async load(api, ctx) {
    const state = ctx.state;
    if (state.missingUntil && Date.now() < state.missingUntil) return { unavailable: true };
    const since = Math.floor(serverNow() - (state.range || 86400));
    try {
      const answer = await api.get(`/usage?group_by=key,model&since=${since}`);
      return { rows: answer.usage || [] };
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 404) {
        state.missingUntil = Date.now() + RECHECK_MS;
        return { unavailable: true };
      }
      throw exc;
    }
  },

  render(data) {
    if (data.unavailable) {
      return h(
        "div",
        { class: "banner note" },
        "Usage is not available on this frontend: it has no GET /api/usage endpoint yet.",
      );
    }
    const rows = [...data.rows].sort((a, b) => (b.total_tokens || 0) - (a.total_tokens || 0));
    const n = (v) => (v === undefined || v === null ? "—" : Number(v).toLocaleString());
    return table(
      "usage",
      [
        {
          title: "API key",
          cell: (u) =>
            u.key_id
              ? h("span", { title: u.key_id }, u.key_name || u.key_id)
              : h("span", { class: "muted" }, "no key"),
        },
        { title: "Model", cell: (u) => u.model },
        { title: "Requests", cell: (u) => n(u.requests) },
        { title: "Errors", cell: (u) => n(u.errors) },
        { title: "Prompt tokens", cell: (u) => n(u.prompt_tokens) },
        { title: "Completion tokens", cell: (u) => n(u.completion_tokens) },
        { title: "Total tokens", cell: (u) => n(u.total_tokens) },
      ],
      rows,
      { empty: "No requests in this window." },
    );
  },
};
