// Models: backend, scheduling, replicas by state, load progress, revision; edit scheduling.

import { ApiError, seg } from "../api.js";
import { activeLoads } from "../cluster.js";
import { formDialog } from "../dialogs.js";
import {
  button,
  chips,
  countPills,
  formatPairs,
  h,
  parsePairs,
  pill,
  progress,
  table,
  tally,
} from "../dom.js";

export default {
  title: "Models",

  async load(api) {
    const [models, replicas, loads] = await Promise.all([
      api.get("/models"),
      api.get("/replicas"),
      api.get("/loads"),
    ]);
    return { models: models.models, replicas: replicas.replicas, loads: activeLoads(loads) };
  },

  render(data, ctx) {
    const loads = new Map(data.loads.map((l) => [l.model, l]));
    const models = [...data.models].sort((a, b) => a.name.localeCompare(b.name));
    return table(
      "models",
      [
        { title: "Name", cell: (m) => h("strong", {}, m.name) },
        { title: "Backend", cell: (m) => [m.backend, capabilities(m)] },
        {
          title: "Replicas",
          cell: (m) =>
            countPills(
              tally(
                data.replicas.filter((r) => r.model === m.name),
                (r) => r.state,
              ),
            ),
        },
        {
          title: "Min / max",
          cell: (m) =>
            `${m.scheduling.min_replicas} / ${m.scheduling.max_replicas || "∞"}${m.scheduling.spread_all ? " · every node" : ""}`,
        },
        { title: "Node selector", cell: (m) => chips(m.scheduling.node_selector, "any node") },
        { title: "Load", cell: (m) => load(loads.get(m.name)) },
        {
          title: "Revision",
          cell: (m) => h("code", { title: String(m.revision) }, String(m.revision).slice(0, 12)),
        },
        {
          title: "",
          class: "actions",
          cell: (m) => button("Scheduling", () => editScheduling(m, ctx)),
        },
      ],
      models,
      {
        empty: "No model is declared: add a YAML file to the models directory.",
        rowKey: (m) => m.name,
      },
    );
  },
};

function capabilities(model) {
  if (!Array.isArray(model.capabilities) || !model.capabilities.length) return null;
  return h("div", { class: "muted small" }, model.capabilities.join(", "));
}

function load(job) {
  if (!job) return h("span", { class: "muted" }, "—");
  return [pill(job.state, job.error), " ", progress(job.percent, job.phase)];
}

function editScheduling(model, ctx) {
  const s = model.scheduling;
  const field = (id, label, input) => h("div", {}, h("label", { for: id }, label), input);
  const min = h("input", {
    id: "sched-min",
    type: "number",
    min: "0",
    step: "1",
    value: String(s.min_replicas),
  });
  const max = h("input", {
    id: "sched-max",
    type: "number",
    min: "0",
    step: "1",
    value: String(s.max_replicas),
  });
  const delay = h("input", {
    id: "sched-delay",
    type: "number",
    min: "0",
    step: "any",
    value: String(s.scale_down_delay),
  });
  const spread = h("input", {
    id: "sched-spread",
    type: "checkbox",
    checked: Boolean(s.spread_all),
  });
  const selector = h(
    "textarea",
    { id: "sched-selector", spellcheck: "false" },
    formatPairs(s.node_selector),
  );
  return formDialog(
    `Scheduling of ${model.name}`,
    [
      h(
        "div",
        { class: "row" },
        field("sched-min", "Min replicas", min),
        field("sched-max", "Max replicas (0 = no cap)", max),
      ),
      field("sched-delay", "Scale-down delay (s)", delay),
      h("label", { class: "inline" }, spread, "One replica on every matching node"),
      field("sched-selector", "Node selector (key=value per line)", selector),
    ],
    async () => {
      const wanted = {
        min_replicas: integer(min.value, "min replicas"),
        max_replicas: integer(max.value, "max replicas"),
        spread_all: spread.checked,
        node_selector: parsePairs(selector.value),
        scale_down_delay: Number(delay.value),
      };
      await saveScheduling(ctx.api, model, wanted);
      ctx.refresh();
    },
    { id: "scheduling" },
  );
}

/** PATCH only what changed when the frontend has it; otherwise PUT the whole block. */
async function saveScheduling(api, model, wanted) {
  const path = `/models/${seg(model.name)}/scheduling`;
  const changed = Object.fromEntries(
    Object.entries(wanted).filter(
      ([k, v]) => JSON.stringify(v) !== JSON.stringify(model.scheduling[k]),
    ),
  );
  if (!Object.keys(changed).length) return;
  try {
    await api.patch(path, changed);
  } catch (exc) {
    if (!(exc instanceof ApiError && (exc.status === 405 || exc.status === 404))) throw exc;
    await api.put(path, { ...model.scheduling, ...wanted });
  }
}

function integer(text, what) {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0) throw new Error(`${what}: a whole number, 0 or more`);
  return n;
}
