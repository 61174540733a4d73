// backer dashboard: reads the token from the URL fragment, fetches the JSON API with it, and
// follows the event stream. Every value from the node is set as text, never parsed as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "backer-token";
  const MAX_RECENT = 50;
  const REFRESH_EVERY_MS = 5000;
  const FINISHED_SHOWN_MS = 4000; // a finished transfer stays listed this long
  const ACTIONS = { file: "updated", dir: "folder", symlink: "link", deleted: "deleted" };
  const state = {
    token: null,
    transfers: new Map(), // "folder\0path" -> {folder, path, done, total, finished}
    recent: [], // newest first
    statusTimer: null,
    conflictTimer: null,
  };

  // -- small helpers ------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fill(container, nodes, emptyText) {
    container.replaceChildren(...(nodes.length ? nodes : [el("p", { class: "empty" }, emptyText)]));
  }

  function human(bytes) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return (unit ? value.toFixed(1) : String(value)) + " " + units[unit];
  }

  const leftText = (left) => left.files + (left.files === 1 ? " file, " : " files, ") + human(left.bytes);
  const short = (device) => (device || "").slice(0, 7) || "?";
  const basename = (path) => path.replace(/\/+$/, "").split("/").pop() || path;
  const clock = (seconds) => new Date(seconds * 1000).toLocaleTimeString();

  function fact(label, value) {
    return el("span", {}, label + " ", el("b", {}, value));
  }

  function pill(text, kind) {
    return el("span", { class: "pill pill-" + kind }, text);
  }

  function problem(text) {
    const box = $("problem");
    box.textContent = text || "";
    box.hidden = !text;
  }

  // -- the token and the API ------------------------------------------------------------------

  function readToken() {
    const match = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (match) {
      const token = decodeURIComponent(match[1]);
      sessionStorage.setItem(TOKEN_KEY, token);
      history.replaceState(null, "", location.pathname); // the address bar no longer shows it
      return token;
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function api(path) {
    const response = await fetch(path, {
      headers: { Authorization: "Bearer " + state.token },
      cache: "no-store",
    });
    if (response.status === 401) {
      throw new Error("the token was refused: open the URL that `backer open` prints");
    }
    if (!response.ok) throw new Error(path + " answered " + response.status);
    return response.json();
  }

  // -- status: folders and peers ----------------------------------------------------------------

  function folderState(folder) {
    const peers = folder.peers || [];
    const inSync = peers.filter((p) => p.in_sync).length;
    if (folder.state !== "ok") {
      return [pill(folder.state.split(":")[0], "bad"), inSync, peers.length];
    }
    if (!peers.length) return [pill("waiting for peers", "wait"), 0, 0];
    if (inSync === peers.length) return [pill("in sync", "ok"), inSync, peers.length];
    return [pill("syncing", "wait"), inSync, peers.length];
  }

  function renderStatus(status) {
    $("device").textContent = status.device ? "device " + short(status.device) : "";
    $("device").title = status.device || "";
    const folders = status.folders || [];
    fill(
      $("folders"),
      folders.map((folder) => {
        const [badge, inSync, total] = folderState(folder);
        return el(
          "div",
          { class: "row folder", "data-path": folder.path },
          el("span", { class: "main-text path", title: folder.path }, folder.path),
          badge,
          el(
            "span",
            { class: "facts" },
            fact("peers in sync", inSync + "/" + total),
            folder.left ? fact("left to receive", leftText(folder.left)) : null,
            folder.root ? fact("root", folder.root.slice(0, 12)) : null,
            "watching" in folder ? fact("watching", folder.watching ? "yes" : "no") : null,
            folder.state !== "ok" ? el("span", {}, folder.state) : null,
          ),
        );
      }),
      "No folders: `backer init DIR` shares one, `backer join KEY DIR` joins one.",
    );
    const peers = [];
    const known = [];
    for (const folder of folders) {
      for (const peer of folder.peers || []) {
        peers.push(
          el(
            "div",
            { class: "row peer", "data-device": peer.device },
            el("span", { class: "main-text path", title: peer.device }, short(peer.device)),
            peer.in_sync ? pill("in sync", "ok") : pill("syncing", "wait"),
            el(
              "span",
              { class: "facts" },
              fact("address", peer.address || "?"),
              fact("found by", peer.found_by),
              fact("direction", peer.outgoing ? "we dialled" : "it dialled"),
              folders.length > 1 ? fact("folder", basename(folder.path)) : null,
            ),
          ),
        );
      }
      for (const address of folder.known || []) {
        known.push(
          el(
            "div",
            { class: "row" },
            el("span", { class: "main-text path" }, address.address),
            el(
              "span",
              { class: "facts" },
              fact("state", address.state),
              fact("found by", address.found_by),
              address.device ? fact("device", short(address.device)) : null,
            ),
          ),
        );
      }
    }
    fill($("peers"), peers, "No peers connected.");
    fill($("known"), known, "No addresses known yet.");
  }

  async function refreshStatus() {
    state.statusTimer = null;
    try {
      renderStatus(await api("/api/status"));
      problem("");
    } catch (error) {
      problem(String(error.message || error));
    }
  }

  function soonStatus() {
    if (state.statusTimer === null) state.statusTimer = setTimeout(refreshStatus, 200);
  }

  // -- conflicts ------------------------------------------------------------------------------

  async function refreshConflicts() {
    state.conflictTimer = null;
    try {
      const folders = await api("/api/conflicts");
      const rows = [];
      for (const folder of folders) {
        if (folder.error) {
          rows.push(el("div", { class: "row" }, folder.folder + ": " + folder.error));
        }
        for (const path of folder.paths) {
          rows.push(
            el(
              "div",
              { class: "row conflict", "data-path": path },
              el("span", { class: "main-text path", title: path }, path),
              folders.length > 1 ? el("span", { class: "facts" }, basename(folder.folder)) : null,
            ),
          );
        }
        if (folder.count > folder.paths.length) {
          rows.push(el("div", { class: "row muted" }, folder.count - folder.paths.length + " more"));
        }
      }
      fill($("conflicts"), rows, "No conflicts.");
    } catch (error) {
      problem(String(error.message || error));
    }
  }

  function soonConflicts() {
    if (state.conflictTimer === null) state.conflictTimer = setTimeout(refreshConflicts, 500);
  }

  // -- transfers and recent changes ------------------------------------------------------------

  function renderTransfers() {
    const rows = [...state.transfers.values()].map((t) => {
      const percent = t.total ? Math.floor((t.done * 100) / t.total) : 100;
      return el(
        "div",
        { class: "row transfer", "data-path": t.path },
        el("span", { class: "main-text path", title: t.path }, t.path),
        el("span", { class: "facts" }, percent + "% of " + human(t.total)),
        el("progress", { max: Math.max(t.total, 1), value: t.done }),
      );
    });
    fill($("transfers"), rows, "Nothing being transferred.");
  }

  function renderRecent() {
    $("recent").replaceChildren(
      ...state.recent.map((event) => {
        const conflict = event.type === "conflict_found";
        const label = conflict ? "conflict" : ACTIONS[event.action] || event.action;
        return el(
          "li",
          { class: "row change", "data-path": event.path },
          el("span", { class: "time" }, clock(event.time)),
          pill(label, conflict ? "bad" : event.action === "deleted" ? "wait" : "ok"),
          el("span", { class: "main-text path", title: event.folder }, event.path),
          conflict ? el("span", { class: "facts" }, "other version kept as " + event.copy) : null,
        );
      }),
    );
    $("recent-empty").hidden = state.recent.length > 0;
  }

  function forgetLater(key) {
    setTimeout(() => {
      const entry = state.transfers.get(key);
      if (entry && entry.finished) state.transfers.delete(key);
      renderTransfers();
    }, FINISHED_SHOWN_MS);
  }

  function onEvent(event) {
    switch (event.type) {
      case "file_progress": {
        const key = event.folder + "\0" + event.path;
        state.transfers.set(key, { ...event, finished: event.done >= event.total });
        if (event.done >= event.total) forgetLater(key);
        renderTransfers();
        break;
      }
      case "file_updated":
      case "conflict_found":
        state.recent.unshift(event);
        state.recent.length = Math.min(state.recent.length, MAX_RECENT);
        renderRecent();
        break;
      case "pull_finished":
        for (const [key, entry] of state.transfers) {
          if (entry.folder === event.folder && !entry.finished) {
            entry.finished = true; // done, or abandoned: the pull is over either way
            forgetLater(key);
          }
        }
        soonStatus();
        if (event.files || event.deleted || event.conflicts) soonConflicts(); // now indexed
        break;
      case "folder_scanned":
        soonConflicts();
        soonStatus();
        break;
      case "dropped":
        soonStatus();
        soonConflicts();
        break;
      default:
        soonStatus(); // peers came or went, a folder paused or resumed...
    }
  }

  // -- the live stream ------------------------------------------------------------------------

  function follow() {
    const live = $("live");
    const source = new EventSource("/api/events?token=" + encodeURIComponent(state.token));
    source.onopen = () => {
      live.textContent = "live";
      live.className = "pill pill-ok";
      state.recent = []; // the stream starts with the recent events again
      state.transfers.clear();
      renderRecent();
      renderTransfers();
      refreshStatus();
      refreshConflicts();
    };
    source.onmessage = (message) => onEvent(JSON.parse(message.data));
    source.onerror = () => {
      const closed = source.readyState === EventSource.CLOSED;
      live.textContent = closed ? "disconnected" : "reconnecting…";
      live.className = "pill " + (closed ? "pill-bad" : "pill-wait");
      if (closed) problem("The live stream was refused: reload with the URL `backer open` prints.");
    };
  }

  function start() {
    state.token = readToken();
    if (!state.token) {
      problem("No access token: open the URL that `backer open` prints (it ends in #token=…).");
      $("live").textContent = "no token";
      $("live").className = "pill pill-bad";
      return;
    }
    renderRecent();
    follow();
    setInterval(() => {
      if (!document.hidden) refreshStatus();
    }, REFRESH_EVERY_MS);
  }

  start();
})();
