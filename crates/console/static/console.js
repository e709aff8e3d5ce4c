// Live updates by server-sent events: a workflow's steps turn done as they
// finish, the fleet's rows follow the registry. Nothing else runs here.
"use strict";
(function () {
  const page = document.body.dataset.page;
  const id = document.body.dataset.id;
  const path = (s) => s.split("/").map(encodeURIComponent).join("/");

  function setText(el, text) { if (el) { el.textContent = text; } }

  function showWorkflow(w) {
    setText(document.getElementById("wf-status"), w.status);
    const table = document.getElementById("steps-" + w.workflow_id);
    if (!table) { return; }
    setText(table.querySelector(".wf-status"), w.status);
    for (const s of w.steps) {
      const row = table.querySelector('tr[data-step="' + s.index + '"]');
      if (!row) { continue; }
      row.className = "state-" + s.state;
      setText(row.querySelector(".state"), s.state);
      setText(row.querySelector(".attempts"), String(s.attempts));
      const note = row.querySelector(".note");
      if (note) {
        note.textContent = "";
        if (s.last_error) {
          const err = document.createElement("span");
          err.className = "error";
          err.textContent = s.last_error;
          note.appendChild(err);
        } else {
          note.textContent = s.detail;
        }
      }
    }
  }

  if (page === "workflow" && id) {
    const events = new EventSource("/events/workflows/" + path(id));
    events.addEventListener("workflow", (e) => {
      const w = JSON.parse(e.data);
      showWorkflow(w);
      if (w.status !== "RUNNING") { events.close(); }
    });
    events.addEventListener("end", () => events.close());
  }

  if (page === "fleet") {
    const events = new EventSource("/events/fleet");
    events.addEventListener("tenant", (e) => {
      const t = JSON.parse(e.data);
      const row = document.querySelector('tr[data-tenant="' + CSS.escape(t.tenant_id) + '"]');
      if (row) {
        setText(row.querySelector(".status"), t.status);
        setText(row.querySelector(".tier"), t.tier);
        setText(row.querySelector(".model"), t.model);
      } else {
        setText(document.getElementById("live"), "New tenant " + t.tenant_id + ": reload to see it.");
      }
    });
    events.addEventListener("busy", (e) => {
      events.close();
      setText(document.getElementById("live"), "Live updates paused: " + e.data + ".");
    });
  }
})();
