// API keys: list, create (the secret is shown once), revoke.

import { seg } from "../api.js";
import { openDialog } from "../dialogs.js";
import { ago, button, h, table, when } from "../dom.js";

export default {
  title: "API keys",

  toolbar(ctx) {
    const name = h("input", {
      id: "key-name",
      name: "name",
      placeholder: "New key name",
      maxlength: "255",
      required: true,
    });
    const role = h(
      "select",
      { id: "key-role", "aria-label": "Role" },
      h("option", { value: "inference" }, "inference"),
      h("option", { value: "admin" }, "admin"),
    );
    return h(
      "form",
      {
        class: "toolbar",
        onsubmit: (event) => {
          event.preventDefault();
          const body = { name: name.value.trim() };
          if (!body.name) return;
          body.role = role.value;
          ctx.act(async () => {
            const created = await ctx.api.post("/keys", body);
            name.value = "";
            showSecret(created, ctx);
          });
        },
      },
      name,
      role,
      h("button", { type: "submit", class: "button primary" }, "Create key"),
    );
  },

  async load(api) {
    return (await api.get("/keys")).keys;
  },

  render(keys, ctx) {
    return h(
      "div",
      {},
      table(
        "keys",
        [
          { title: "Name", cell: (k) => h("strong", {}, k.name) },
          { title: "ID", cell: (k) => h("code", {}, k.id) },
          { title: "Role", cell: (k) => k.role || "" },
          { title: "Models", cell: (k) => (k.models ? k.models.join(", ") : "all") },
          {
            title: "Created",
            cell: (k) => h("span", { title: when(k.created_at) }, created(k.created_at)),
          },
          { title: "", class: "actions", cell: (k) => revoke(k, ctx) },
        ],
        keys,
        {
          empty:
            "No API key is stored: unless the frontend has --api-keys, /v1 is open. The admin API always needs an admin key (or loopback while none is configured).",
          rowKey: (k) => k.id,
        },
      ),
      h(
        "p",
        { class: "muted small" },
        "Keys from the frontend's --api-keys setting and its data dir's admin.key are not listed. Only a digest of each key is stored. Inference keys may use /v1 only; admin keys the admin API too.",
      ),
    );
  },
};

function created(value) {
  const ms = Date.parse(value);
  return Number.isNaN(ms) ? String(value || "") : ago(ms / 1000);
}

function revoke(key, ctx) {
  return button(
    "Revoke",
    () =>
      ctx.act(() => ctx.api.del(`/keys/${seg(key.id)}`), {
        title: `Revoke ${key.name}?`,
        message: "Clients using this key get 401 from now on. This cannot be undone.",
        label: "Revoke",
      }),
    "danger",
  );
}

function showSecret(created, ctx) {
  const secret = h("code", { id: "new-key-secret", class: "secret" }, created.key);
  const copy = button("Copy", async () => {
    try {
      await navigator.clipboard.writeText(created.key);
      copy.textContent = "Copied";
    } catch {
      getSelection().selectAllChildren(secret);
      copy.textContent = "Selected: press Ctrl+C";
    }
  });
  const body = [h("p", {}, "Copy the secret now: it is not shown again."), secret, copy];
  const actions = [];
  if (!ctx.signedIn()) {
    body.push(
      h(
        "p",
        { class: "muted small" },
        "While any key is stored, every /v1 request needs one; the admin API (this dashboard) an admin key.",
      ),
    );
    actions.push({ label: "Use it for this dashboard", run: async () => ctx.useKey(created.key) });
  }
  actions.push({ label: "Done", kind: "primary" });
  return openDialog({ title: `Key ${created.name} created`, id: "secret", body, actions });
}
