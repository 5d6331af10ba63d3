/* Order page: live state over the order's websocket, the config and its QR code built here
 * with the private key this browser holds, stop, and re-key. */
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
  const ENDED = ["completed", "cancelled", "failed"];
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
    const reached = STEPS.indexOf(state.state);
    ui.steps.forEach((li, i) => {
      li.classList.toggle("done", reached >= 0 && i < reached);
      li.classList.toggle("current", i === reached);
      if (i === reached) li.setAttribute("aria-current", "step");
      else li.removeAttribute("aria-current");
    });
    ui.jobAddress.textContent = state.job_address || "being allocated…";
    ui.providerAddress.textContent = state.provider_address || "—";
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
  }

  let lastPanels = null;
  let panelTimer = null;
  let panelsLoaded = 0;

  // Usage, receipt and history are rendered by the server: fetched when something they show
  // changed, at most every few seconds while traffic is flowing.
  function maybeRefreshPanels(previous) {
    const signature = [state.state, state.settled, state.bytes_in, state.bytes_out, state.wireguard_public_key].join("|");
    if (lastPanels === null) lastPanels = [previous.state, previous.settled, previous.bytes_in, previous.bytes_out, previous.wireguard_public_key].join("|");
    if (signature === lastPanels) return;
    lastPanels = signature;
    const wait = previous.state !== state.state ? 0 : Math.max(0, 5000 - (Date.now() - panelsLoaded));
    clearTimeout(panelTimer);
    panelTimer = setTimeout(refreshPanels, wait);
  }

  async function refreshPanels() {
    panelsLoaded = Date.now();
    try {
      const html = await Molt.api("GET", root.dataset.panelsUrl, { raw: true, accept: "text/html" });
      const fresh = new DOMParser().parseFromString(html, "text/html");
      fresh.querySelectorAll("[data-panel]").forEach((panel) => {
        const current = document.getElementById(panel.id);
        if (current) current.replaceWith(document.importNode(panel, true));
      });
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
      if (previous.state !== state.state && ENDED.includes(state.state) && !busy) {
        Molt.setStatus(ui.status, `The order is ${state.state}.`, "ok");
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

  async function withBusy(button, message, work) {
    busy = true;
    render();
    Molt.setStatus(ui.status, message, "busy");
    try {
      await work();
    } catch (err) {
      Molt.setStatus(ui.status, err.message, "error");
    } finally {
      busy = false;
      render();
      button.focus();
    }
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

  if (!Molt.keys.supported()) $("webcrypto-missing").hidden = false;
  render();
  connect();
})();
