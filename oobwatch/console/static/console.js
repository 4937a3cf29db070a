// Live tables: rows from the server-sent event stream, built as text (never as HTML).
"use strict";

(function () {
  const MAX_ROWS = 500;

  function cell(row, key, value, event) {
    const td = document.createElement("td");
    const text = value === null || value === undefined ? "" : String(value);
    if (key === "sandbox" && text) {
      const link = document.createElement("a");
      link.href = "/ui/sandboxes/" + encodeURIComponent(String(event.sandbox_name));
      link.textContent = text;
      td.appendChild(link);
    } else if (key === "time") {
      td.textContent = text.slice(0, 19).replace("T", " ");
      td.title = text;
      td.className = "time";
    } else {
      td.textContent = text;
    }
    if (key === "detail") td.className = "evidence";
    row.appendChild(td);
  }

  function follow(table) {
    const body = table.tBodies[0];
    const columns = (table.dataset.columns || "time,type,protocol,source,canary,detail").split(",");
    const state = document.querySelector("[data-live-state]");
    const params = new URLSearchParams(table.dataset.live);
    let wait = 5000;

    function say(text) {
      if (state) state.textContent = text;
    }

    // A new stream resumes after the newest row this page has.
    function connect() {
      const source = new EventSource("/ui/live?" + params.toString());
      source.addEventListener("open", function () {
        say("live");
      });
      source.addEventListener("error", function () {
        say("reconnecting…");
      });
      source.addEventListener("busy", function () {
        source.close();
        say("not live: too many live views are open; trying again in " + wait / 1000 + " s");
        setTimeout(connect, wait);
        wait = Math.min(wait * 2, 120000);
      });
      source.addEventListener("ended", function () {
        source.close();
        say("signed out: reload to sign in");
      });
      source.addEventListener("skipped", function () {
        say("live; hits came faster than shown: the timeline has every one");
      });
      source.addEventListener("row", function (message) {
        const event = JSON.parse(message.data);
        wait = 5000;
        params.set("after", String(Math.max(Number(params.get("after")) || 0, event.seq)));
        const row = document.createElement("tr");
        row.className = "fresh type-" + String(event.type).replace(/[^a-z_]/g, "");
        row.dataset.seq = String(event.seq);
        for (const key of columns) cell(row, key, event[key], event);
        const empty = body.querySelector("tr.empty");
        if (empty) empty.remove();
        if (table.dataset.order === "oldest-first") body.appendChild(row);
        else body.insertBefore(row, body.firstChild);
        while (body.rows.length > MAX_ROWS) {
          body.deleteRow(table.dataset.order === "oldest-first" ? 0 : -1);
        }
      });
    }

    connect();
  }

  document.querySelectorAll("table[data-live]").forEach(follow);
})();
