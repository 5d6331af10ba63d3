/* Order page: live state over the order's websocket, the config and its QR code built here
 * with the private key this browser holds, stop, re-key, and disputing a settled order. */
"use strict";

(function () {
  const root = document.getElementById("order-page");
  if (!root) return;
  const orderId = root.dataset.orderId;
  const $ = (id) => document.getElementById(id);
  const ui = {
    state: $("order-state"),
    reason: $("order-reason"),
    live: $("live-status"),
    steps: document.querySelectorAll("#steps li"),
    jobAddress: $("job-address"),
    providerAddress: $("provider-address"),
    tunnelPath: $("tunnel-path"),
    roundTrip: $("round-trip"),
    publicKey: $("public-key"),
    keyStatus: $("key-status"),
    download: $("download-config"),
    showQr: $("show-qr"),
    rekey: $("rekey"),
    stop: $("stop"),
    status: $("action-status"),
    qrPanel: $("qr-panel"),
    qr: $("qr"),
    panels: $("panels"),
  };
  const ENDED = ["completed", "cancelled", "failed", "disputed", "resolved"];
  const DISPUTED = ["disputed", "resolved"];
  const STEPS = ["pending", "provisioning", "running", "stopping", "completed"];
  let state = JSON.parse($("order-snapshot").textContent);
  let busy = false;

  function heldKey() {
    return Molt.keys.forOrder(orderId, state.wireguard_public_key);
  }

  // --- rendering -----------------------------------------------------------------------------

  function render() {
    ui.state.textContent = state.state;
    ui.state.dataset.state = state.state;
    ui.state.className = `state-badge state-${state.state}`;
    ui.reason.textContent = state.reason || "";
    ui.reason.hidden = !state.reason;
    // A disputed or resolved order went through every step first.
    const reached = STEPS.indexOf(DISPUTED.includes(state.state) ? "completed" : state.state);
    ui.steps.forEach((li, i) => {
      li.classList.toggle("done", reached >= 0 && i < reached);
      li.classList.toggle("current", i === reached);
      if (i === reached) li.setAttribute("aria-current", "step");
      else li.removeAttribute("aria-current");
    });
    ui.jobAddress.textContent = state.job_address || "being allocated…";
    ui.providerAddress.textContent = state.provider_address || "—";
    ui.tunnelPath.textContent = state.path || "—";
    renderRoundTrip();
    ui.publicKey.textContent = state.wireguard_public_key;

    const ended = ENDED.includes(state.state);
    if (ended) Molt.keys.forget(orderId); // the tunnel is gone: its key is of no further use
    const key = ended ? null : heldKey();
    if (ended) {
      ui.keyStatus.textContent = "The order has ended; this browser has deleted its private key.";
    } else if (key) {
      ui.keyStatus.textContent = state.peer_applied || state.state === "pending"
        ? "held in this browser (never sent to MOLT)"
        : "held in this browser; the provider node is applying it…";
    } else {
      ui.keyStatus.textContent = "not in this browser. Re-key to make a new pair here (a config made elsewhere stops working).";
    }
    ui.keyStatus.classList.toggle("missing", !ended && !key);
    ui.download.disabled = busy || !key || !state.can_download;
    ui.showQr.disabled = ui.download.disabled;
    if (ui.download.disabled && !ui.qrPanel.hidden) hideQr();
    ui.rekey.disabled = busy || !state.can_rekey || !Molt.keys.supported();
    ui.stop.disabled = busy || !state.can_stop;
    syncDisputeForm();
  }

  // The node's latest ping of this tunnel, aged here (frontend.order_state.age writes the same).
  function age(seconds) {
    if (seconds < 60) return `${seconds} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
    return `${Math.floor(seconds / 3600)} h`;
  }

  function renderRoundTrip() {
    const trip = state.round_trip;
    if (!trip) {
      ui.roundTrip.textContent = "not measured yet";
      return;
    }
    const seconds = Math.max(0, Math.floor((Date.now() - Date.parse(trip.at)) / 1000));
    ui.roundTrip.textContent = `${trip.text} (measured ${age(seconds)} ago)`;
  }
  setInterval(renderRoundTrip, 10000);

  let lastPanels = null;
  let panelTimer = null;
  let panelsLoaded = 0;

  // Usage, receipt, dispute and history are rendered by the server: fetched when something
  // they show changed, at once for a new state, else at most every few seconds while traffic
  // is flowing. Resolves once a fetch started now is in.
  // The Connect panel (the sandbox) redraws at once on a new sandbox state, like the order's.
  function sandboxSignature(s) {
    const box = s.sandbox;
    return box ? [box.state, box.progress, box.at].join("/") : "none";
  }

  function sandboxState(s) {
    return s.sandbox ? s.sandbox.state : "none";
  }

  function maybeRefreshPanels(previous) {
    const signature = [state.state, state.settled, state.bytes_in, state.bytes_out, state.wireguard_public_key, sandboxSignature(state)].join("|");
    if (lastPanels === null) lastPanels = [previous.state, previous.settled, previous.bytes_in, previous.bytes_out, previous.wireguard_public_key, sandboxSignature(previous)].join("|");
    if (signature === lastPanels) return Promise.resolve();
    lastPanels = signature;
    clearTimeout(panelTimer);
    if (previous.state !== state.state || sandboxState(previous) !== sandboxState(state)) return refreshPanels();
    panelTimer = setTimeout(refreshPanels, Math.max(0, 5000 - (Date.now() - panelsLoaded)));
    return Promise.resolve();
  }

  async function refreshPanels() {
    panelsLoaded = Date.now();
    try {
      const html = await Molt.api("GET", root.dataset.panelsUrl, { raw: true, accept: "text/html" });
      const fresh = new DOMParser().parseFromString(html, "text/html");
      // A reason being typed survives the dispute panel being redrawn under it, and so does
      // focus: whatever had it inside a panel (a heading focus was moved to, the field being
      // typed in) has it again in the redrawn panel, or keyboard and screen-reader users would
      // be thrown back to the top of the page by a live update.
      const reason = $("dispute-reason");
      const draft = reason ? reason.value : "";
      const active = document.activeElement;
      const activePanel = active && active.closest ? active.closest("[data-panel]") : null;
      const focusedId = activePanel && active.id ? active.id : "";
      const focusedPanel = activePanel ? activePanel.id : "";
      fresh.querySelectorAll("[data-panel]").forEach((panel) => {
        const current = document.getElementById(panel.id);
        if (current) current.replaceWith(document.importNode(panel, true));
      });
      const redrawn = $("dispute-reason");
      if (redrawn && draft) redrawn.value = draft;
      // What had focus may be gone from the redrawn panel (the dispute form's button once the
      // dispute is open): focus then goes to that panel's heading, never back to the page top.
      let refocus = focusedId && document.getElementById(focusedId);
      if (!refocus && focusedPanel) {
        const panel = document.getElementById(focusedPanel);
        const heading = panel && panel.getAttribute("aria-labelledby");
        refocus = heading && document.getElementById(heading);
      }
      if (refocus && document.activeElement !== refocus) refocus.focus();
      syncDisputeForm();
    } catch (err) {
      // The panels stay as they were; the next change tries again.
    }
  }

  // --- the live channel ----------------------------------------------------------------------

  let socket = null;
  let retry = 0;
  let closedForGood = false;

  function setLive(text, kind) {
    ui.live.textContent = text;
    ui.live.className = `live ${kind || ""}`;
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${window.location.host}${root.dataset.wsPath}`);
    socket.addEventListener("open", () => {
      retry = 0;
      setLive("live", "ok");
    });
    socket.addEventListener("message", (event) => {
      let data;
      try {
        data = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      if (data.type !== "order" || String(data.id) !== String(orderId)) return;
      const previous = state;
      state = data;
      if (previous.state !== state.state && !busy) {
        if (state.state === "resolved") {
          sayDispute("An operator resolved your dispute: the outcome is below.", "ok");
        } else if (ENDED.includes(state.state) && !DISPUTED.includes(state.state)) {
          Molt.setStatus(ui.status, `The order is ${state.state}.`, "ok");
        }
      }
      render();
      maybeRefreshPanels(previous);
    });
    socket.addEventListener("close", (event) => {
      if (event.code === 4401) {
        closedForGood = true;
        setLive("not following: you are logged out. Log in again to see live changes.", "error");
        return;
      }
      if (event.code === 4404) {
        closedForGood = true;
        setLive("not following: this order is not yours or no longer exists.", "error");
        return;
      }
      if (closedForGood) return;
      retry = Math.min(retry + 1, 6);
      const delay = Math.min(1000 * 2 ** (retry - 1), 15000);
      setLive(`connection lost; reconnecting in ${Math.round(delay / 1000)} s…`, "busy");
      setTimeout(connect, delay);
    });
  }

  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "refresh" }));
    }
  });

  // --- config and QR code --------------------------------------------------------------------

  async function configText() {
    const key = heldKey();
    if (!key) throw new Error("This browser does not hold this order's private key: re-key first.");
    const template = await Molt.api("GET", root.dataset.confUrl, { raw: true, accept: "text/plain, application/json" });
    const placeholder = /^#\s*PrivateKey\s*=.*$/m;
    if (!placeholder.test(template)) throw new Error("The config from the server has no PrivateKey line to fill in.");
    // Filled in here, in memory: the private key goes into the file and nowhere else.
    return template.replace(placeholder, `PrivateKey = ${key.privateKey}`);
  }

  // One action at a time: every button is disabled while `work` runs, `say` shows its progress
  // and its error, and focus goes back to the button (or, if the panels were redrawn and it is
  // gone, to `focusAfter`).
  async function withBusy(button, message, work, { say = sayAction, focusAfter = null } = {}) {
    busy = true;
    render();
    say(message, "busy");
    try {
      await work();
    } catch (err) {
      say(err.message, "error");
    } finally {
      busy = false;
      render();
      const target = button.isConnected ? button : focusAfter && focusAfter();
      if (target) target.focus();
    }
  }

  function sayAction(message, kind) {
    Molt.setStatus(ui.status, message, kind);
  }

  ui.download.addEventListener("click", () =>
    withBusy(ui.download, "Preparing your config…", async () => {
      const text = await configText();
      const url = URL.createObjectURL(new Blob([text], { type: "text/plain" }));
      const link = document.createElement("a");
      link.href = url;
      link.download = `molt-order-${orderId}.conf`;
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      Molt.setStatus(ui.status, `Saved molt-order-${orderId}.conf. Keep it private: it holds your key.`, "ok");
    })
  );

  function drawQr(text) {
    const qr = qrcode(0, "M");
    qr.addData(text);
    qr.make();
    const count = qr.getModuleCount();
    const margin = 4;
    const size = count + 2 * margin;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${size} ${size}`);
    svg.setAttribute("shape-rendering", "crispEdges");
    const background = document.createElementNS(ns, "rect");
    background.setAttribute("width", size);
    background.setAttribute("height", size);
    background.setAttribute("fill", "#fff");
    svg.append(background);
    let d = "";
    for (let row = 0; row < count; row += 1) {
      for (let col = 0; col < count; col += 1) {
        if (qr.isDark(row, col)) d += `M${col + margin},${row + margin}h1v1h-1z`;
      }
    }
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", d);
    path.setAttribute("fill", "#000");
    svg.append(path);
    ui.qr.replaceChildren(svg);
  }

  function hideQr() {
    ui.qrPanel.hidden = true;
    ui.qr.replaceChildren(); // do not leave the key on screen
    ui.showQr.textContent = "Show QR code";
    ui.showQr.setAttribute("aria-expanded", "false");
  }

  ui.showQr.addEventListener("click", () => {
    if (!ui.qrPanel.hidden) {
      hideQr();
      return;
    }
    withBusy(ui.showQr, "Making the QR code…", async () => {
      drawQr(await configText());
      ui.qrPanel.hidden = false;
      ui.showQr.textContent = "Hide QR code";
      ui.showQr.setAttribute("aria-expanded", "true");
      Molt.setStatus(ui.status, "");
    });
  });

  // --- stop and re-key -----------------------------------------------------------------------

  ui.stop.addEventListener("click", () => {
    const running = state.state === "running";
    const question = running
      ? "Stop this order now? The tunnel is removed; you pay for the time it ran and the traffic it used."
      : "Cancel this order? Nothing is charged and the hold goes back to your wallet.";
    if (!window.confirm(question)) return;
    withBusy(ui.stop, "Stopping…", async () => {
      const updated = await Molt.api("POST", root.dataset.stopUrl, {
        body: {},
        idempotencyKey: Molt.newIdempotencyKey(),
      });
      const previous = state;
      state = { ...state, state: updated.state, reason: updated.reason };
      maybeRefreshPanels(previous);
      Molt.setStatus(ui.status, running ? "Stopping: the provider node is removing the tunnel…" : "Order cancelled.", "ok");
    });
  });

  ui.rekey.addEventListener("click", () => {
    if (heldKey() && !window.confirm("Make a new key pair? The config you downloaded before stops working.")) return;
    withBusy(ui.rekey, "Making a new key pair in this browser…", async () => {
      const pair = await Molt.keys.generate();
      Molt.keys.savePending(pair);
      Molt.setStatus(ui.status, "Sending the new public key…", "busy");
      let updated;
      try {
        updated = await Molt.api("POST", root.dataset.rekeyUrl, {
          body: { wireguard_public_key: pair.publicKey },
          idempotencyKey: Molt.newIdempotencyKey(),
        });
      } catch (err) {
        if (!(err instanceof Molt.ApiError && err.network)) Molt.keys.dropPending(pair);
        throw err;
      }
      Molt.keys.save(orderId, pair);
      state = { ...state, wireguard_public_key: updated.wireguard_public_key, peer_applied: false };
      Molt.setStatus(ui.status, "New key in place. Download the config again; the provider node swaps the peer in a few seconds.", "ok");
    });
  });

  // --- dispute -------------------------------------------------------------------------------
  // The dispute panel is server-rendered and redrawn when the order's state changes, so its
  // form is found by id each time and its message is kept here to survive the redraw.

  let disputeNote = null;
  let disputeAttempt = null;

  function sayDispute(message, kind) {
    disputeNote = message ? { message, kind } : null;
    Molt.setStatus($("dispute-status"), message, kind);
  }

  function syncDisputeForm() {
    const submit = $("dispute-submit");
    const reason = $("dispute-reason");
    const form = $("dispute-form");
    if (submit) submit.disabled = busy;
    if (reason) reason.readOnly = busy;
    if (form) form.setAttribute("aria-busy", busy ? "true" : "false");
    const status = $("dispute-status");
    if (status && disputeNote && status.textContent !== disputeNote.message) {
      Molt.setStatus(status, disputeNote.message, disputeNote.kind);
    }
  }

  // Copy buttons of the Connect panel (redrawn live, so found through the panels).
  ui.panels.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-copy]");
    if (!button) return;
    const field = $(button.dataset.copy);
    if (!field) return;
    field.focus();
    field.select();
    const done = () => {
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = "Copy"; }, 2000);
    };
    // The Clipboard API needs a secure context; elsewhere the selection stays for Ctrl+C.
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(done, () => {});
    } else {
      try {
        if (document.execCommand("copy")) done();
      } catch (err) {
        /* selected: copied by hand */
      }
    }
  });

  ui.panels.addEventListener("submit", (event) => {
    if (event.target.id !== "dispute-form") return;
    event.preventDefault();
    if (busy) return;
    const form = event.target;
    const field = $("dispute-reason");
    const reason = field.value.trim();
    if (!reason) {
      sayDispute("Say what went wrong first: the operator decides on the refund from it.", "error");
      field.focus();
      return;
    }
    const question =
      `Dispute order #${orderId}? An operator reviews your reason and may refund part or all of the ` +
      `${form.dataset.charged} charged. You can open one dispute per order and cannot withdraw it.`;
    if (!window.confirm(question)) return;
    // One key per attempt; a retry after a lost answer reuses it, so the server answers with
    // the dispute it already opened instead of refusing a second one.
    if (!disputeAttempt || disputeAttempt.reason !== reason) {
      disputeAttempt = { reason, idempotencyKey: Molt.newIdempotencyKey() };
    }
    const attempt = disputeAttempt;
    withBusy(
      $("dispute-submit"),
      "Opening your dispute…",
      async () => {
        try {
          await Molt.api("POST", root.dataset.disputeUrl, {
            body: { reason: attempt.reason },
            idempotencyKey: attempt.idempotencyKey,
          });
        } catch (err) {
          if (err instanceof Molt.ApiError && err.network) {
            throw new Error(`${err.message} Trying again cannot open a second dispute.`);
          }
          disputeAttempt = null;
          // Refused (window closed, already disputed): redraw the panel to show why.
          if (err instanceof Molt.ApiError && err.status === 409) await refreshPanels();
          throw new Error(`Your dispute was not opened: ${err.message}`);
        }
        disputeAttempt = null;
        const previous = state;
        state = { ...state, state: "disputed" };
        sayDispute("Dispute opened. An operator will review it; this page shows the outcome.", "ok");
        render();
        await maybeRefreshPanels(previous);
      },
      { say: sayDispute, focusAfter: () => $("dispute-title") }
    );
  });

  // What a running order has cost grows with time even when no traffic flows (and nothing
  // arrives on the socket): the usage panel is fetched again every half minute while it runs
  // and the page is visible.
  const COST_REFRESH_MS = 30000;
  setInterval(() => {
    if (state.state === "running" && document.visibilityState === "visible" && Date.now() - panelsLoaded >= COST_REFRESH_MS - 1000) {
      refreshPanels();
    }
  }, COST_REFRESH_MS);

  if (!Molt.keys.supported()) $("webcrypto-missing").hidden = false;
  render();
  connect();
})();
