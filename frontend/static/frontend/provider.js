// Provider pages: the nodes list follows its machines live, heartbeat ages tick, the install
// command copies, and deleting a listing asks first. No library; nothing loaded from elsewhere.
//
// Live updates: /ws/provider/ tells the page "node N changed" (never what changed: the page
// fetches the node's card from its own authorized URL, so the server renders every card with
// one template). When the socket (re)opens, the page re-reads all cards, so nothing that
// happened while it was away is missed.
(function () {
  "use strict";

  // -- heartbeat ages and online/offline ------------------------------------------------------
  var list = document.getElementById("nodes");

  function ageText(seconds) {
    if (seconds < 0) seconds = 0;
    if (seconds < 120) return Math.floor(seconds) + " s ago";
    if (seconds < 7200) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 172800) return Math.floor(seconds / 3600) + " h ago";
    return Math.floor(seconds / 86400) + " days ago";
  }

  // Server time minus this browser's clock, so ages do not depend on the browser's clock.
  var skew = 0;
  var offlineAfter = 45;
  if (list) {
    skew = Number(list.dataset.serverNow) - Date.now() / 1000;
    offlineAfter = Number(list.dataset.offlineAfter) || offlineAfter;
  }

  function tick() {
    if (!list) return;
    var now = Date.now() / 1000 + skew;
    list.querySelectorAll(".node-card[data-last-seen]").forEach(function (card) {
      var age = now - Number(card.dataset.lastSeen);
      var label = card.querySelector("[data-age]");
      if (label) label.textContent = ageText(age);
      var status = card.querySelector("[data-status]");
      // No heartbeat within the window: offline, as the server would say on reload.
      if (status && card.dataset.online === "1" && age > offlineAfter) {
        card.dataset.online = "0";
        status.textContent = "offline";
        status.className = "node-status offline";
        updateSummary();
      }
    });
  }

  function updateSummary() {
    var summary = document.getElementById("nodes-summary");
    if (!summary || !list) return;
    var cards = list.querySelectorAll(".node-card:not(.revoked)");
    var online = list.querySelectorAll('.node-card:not(.revoked)[data-online="1"]');
    summary.textContent =
      cards.length + " machine" + (cards.length === 1 ? "" : "s") + ", " + online.length + " online";
    var empty = document.getElementById("no-nodes");
    if (empty) empty.classList.toggle("hidden", list.querySelectorAll(".node-card").length > 0);
  }

  // -- live updates ---------------------------------------------------------------------------
  var statusLine = document.getElementById("live-status");

  function setLive(text, state) {
    if (!statusLine) return;
    statusLine.textContent = text;
    statusLine.dataset.state = state;
  }

  function fetchHtml(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } }).then(
      function (response) {
        if (response.status === 404) return null;
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      }
    );
  }

  function parse(html) {
    var template = document.createElement("template");
    template.innerHTML = html.trim();
    return template.content;
  }

  function refreshCard(nodeId) {
    var url = list.dataset.cardUrl.replace(/\/0\/card\/$/, "/" + nodeId + "/card/");
    return fetchHtml(url).then(function (html) {
      var old = document.getElementById("node-" + nodeId);
      if (html === null) {
        if (old) old.remove();
      } else {
        var card = parse(html).firstElementChild;
        card.classList.add("fresh");
        if (old) {
          old.replaceWith(card);
        } else if (list.dataset.cardsUrl) {
          // A machine that just joined: newest first, as the server orders them.
          var first = list.querySelector(".node-card");
          if (first) list.insertBefore(card, first);
          else list.insertBefore(card, document.getElementById("no-nodes"));
        }
      }
      updateSummary();
      tick();
    });
  }

  function refreshAll() {
    if (!list.dataset.cardsUrl) {
      var card = list.querySelector(".node-card");
      return card ? refreshCard(card.dataset.nodeId) : Promise.resolve();
    }
    return fetchHtml(list.dataset.cardsUrl).then(function (html) {
      if (html === null) return;
      var fresh = parse(html).firstElementChild;
      list.innerHTML = fresh.innerHTML;
      updateSummary();
      tick();
    });
  }

  var delay = 1000;
  function connect() {
    if (!list || !list.dataset.cardUrl || !window.WebSocket) {
      setLive("live updates unavailable: reload to refresh", "off");
      return;
    }
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + window.location.host + "/ws/provider/");
    socket.onmessage = function (event) {
      var message;
      try {
        message = JSON.parse(event.data);
      } catch (error) {
        return;
      }
      if (message.type === "subscribed") {
        delay = 1000;
        setLive("live", "on");
        refreshAll().catch(function () {
          setLive("live (could not refresh: reload the page)", "warn");
        });
      } else if (message.type === "node" && Number.isInteger(message.node)) {
        refreshCard(message.node).catch(function () {
          setLive("live (could not fetch a change: reload the page)", "warn");
        });
      }
    };
    socket.onclose = function (event) {
      if (event.code === 4401) {
        setLive("logged out: log in again for live updates", "off");
        return;
      }
      setLive("reconnecting…", "warn");
      window.setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    };
  }

  if (list) {
    tick();
    window.setInterval(tick, 1000);
    if (statusLine) connect();
  }

  // -- copy the install command -----------------------------------------------------------------
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var input = document.getElementById(button.dataset.copy);
      if (!input) return;
      input.focus();
      input.select();
      var done = function () {
        button.textContent = "Copied";
        window.setTimeout(function () {
          button.textContent = "Copy";
        }, 2000);
      };
      // The Clipboard API needs a secure context (https or localhost); the selection stays
      // for Ctrl+C where it is missing.
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(input.value).then(done, function () {});
      } else {
        try {
          if (document.execCommand("copy")) done();
        } catch (error) {
          /* selected: the person copies by hand */
        }
      }
    });
  });
  document.querySelectorAll("input.token-value").forEach(function (input) {
    input.addEventListener("focus", function () {
      input.select();
    });
  });

  // -- confirm before deleting ----------------------------------------------------------------
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
})();
