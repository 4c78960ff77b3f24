// The one modal dialog: confirmations, edit forms and the new-key secret; API errors show inside it.

import { h } from "./dom.js";

const dialog = () => document.getElementById("dialog");

/**
 * Open the dialog. actions: [{label, kind, run}] — `run` (async) may throw to keep the dialog
 * open with the error shown; an action without `run` just closes. Resolves to the label of the
 * action that closed it, or null when dismissed (Escape, Cancel).
 */
export function openDialog({ title, body = [], actions = [], id = null }) {
  const el = dialog();
  if (el.open) el.close();
  el.replaceChildren();
  el.id = "dialog";
  if (id) el.dataset.kind = id;
  else delete el.dataset.kind;
  const error = h("div", { class: "banner error dialog-error", role: "alert", hidden: true });
  return new Promise((resolve) => {
    let result = null;
    const buttons = actions.map((action) =>
      h(
        "button",
        {
          type: action.submit ? "submit" : "button",
          class: `button ${action.kind || ""}`,
          "data-action": action.label,
          onclick: action.submit ? null : () => run(action),
        },
        action.label,
      ),
    );
    const form = h(
      "form",
      {
        novalidate: true,
        onsubmit: (event) => {
          event.preventDefault();
          const submit = actions.find((a) => a.submit);
          if (submit) run(submit);
        },
      },
      h("h2", {}, title),
      body,
      error,
      h("div", { class: "buttons" }, buttons),
    );

    async function run(action) {
      if (!action.run) {
        result = action.label === "Cancel" ? null : action.label;
        el.close();
        return;
      }
      for (const b of buttons) b.disabled = true;
      error.hidden = true;
      try {
        await action.run();
        result = action.label;
        el.close();
      } catch (exc) {
        error.textContent = exc.message || String(exc);
        error.hidden = false;
      } finally {
        for (const b of buttons) b.disabled = false;
      }
    }

    el.append(form);
    el.addEventListener("close", () => resolve(result), { once: true });
    el.showModal();
    const first = el.querySelector("input, textarea, select");
    if (first) first.focus();
  });
}

/** Ask before something destructive; resolves to true when confirmed. */
export async function confirmAction(title, message, label = "Confirm") {
  const answer = await openDialog({
    title,
    id: "confirm",
    body: [h("p", {}, message)],
    actions: [
      { label: "Cancel" },
      { label, kind: "danger primary", submit: true, run: async () => {} },
    ],
  });
  return answer === label;
}

/** A form dialog: `fields` are nodes; `save` (async) throws to show an error. */
export function formDialog(title, fields, save, { id = null, label = "Save" } = {}) {
  return openDialog({
    title,
    id,
    body: fields,
    actions: [{ label: "Cancel" }, { label, kind: "primary", submit: true, run: save }],
  });
}
