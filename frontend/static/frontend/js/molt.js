/* MOLT: helpers shared by the buyer pages. Plain JavaScript, no dependencies.
 *
 * Molt.api()   talks to the REST API with the session cookie, the CSRF header and an optional
 *              Idempotency-Key, and turns error responses into readable messages.
 * Molt.keys    makes WireGuard key pairs with WebCrypto X25519 and keeps each order's private
 *              key in this browser's localStorage. The private key is never sent anywhere.
 * Money is not formatted here: pages show the server's spelling (marketplace/money.py).
 */
"use strict";

window.Molt = (function () {
  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  class ApiError extends Error {
    constructor(message, status, network) {
      super(message);
      this.status = status;
      this.network = network; // true: no answer came back, the request may or may not have run
    }
  }

  function errorMessage(status, data, text) {
    if (data && typeof data === "object") {
      if (typeof data.detail === "string") return data.detail;
      const parts = [];
      for (const [field, value] of Object.entries(data)) {
        if (field === "code") continue;
        const messages = Array.isArray(value) ? value.join(" ") : String(value);
        parts.push(field === "non_field_errors" ? messages : `${field.replace(/_/g, " ")}: ${messages}`);
      }
      if (parts.length) return parts.join("; ");
    }
    if (text && text.length < 300 && !text.trimStart().startsWith("<")) return text.trim();
    if (status === 403) return "You are not logged in any more (or the page is stale): reload and log in again.";
    if (status >= 500) return `The server failed (${status}). Try again in a moment.`;
    return `Request failed (${status}).`;
  }

  async function api(method, url, options = {}) {
    const headers = { Accept: options.accept || "application/json", "X-CSRFToken": csrfToken() };
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    if (options.idempotencyKey) headers["Idempotency-Key"] = options.idempotencyKey;
    let response;
    try {
      response = await fetch(url, {
        method,
        headers,
        credentials: "same-origin",
        body: options.body === undefined ? undefined : JSON.stringify(options.body),
      });
    } catch (err) {
      throw new ApiError("Could not reach MOLT: check your connection, then try again.", 0, true);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (err) {
      data = null;
    }
    if (!response.ok) throw new ApiError(errorMessage(response.status, data, text), response.status, false);
    return options.raw ? text : data;
  }

  function iecBytes(count) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let value = Number(count);
    for (const unit of units) {
      if (Math.abs(value) < 1024 || unit === "PiB") {
        if (unit === "B") return `${Math.trunc(value)} B`;
        return `${value.toFixed(1).replace(/\.0$/, "")} ${unit}`;
      }
      value /= 1024;
    }
    return String(count);
  }

  function newIdempotencyKey() {
    return crypto.randomUUID();
  }

  function setStatus(element, message, kind) {
    if (!element) return;
    element.textContent = message || "";
    element.classList.remove("error", "busy", "ok");
    if (kind) element.classList.add(kind);
  }

  // --- WireGuard keys ------------------------------------------------------------------------
  //
  // Why localStorage (not IndexedDB): the buyer comes back to an order hours later, in a new
  // tab or after a restart, to download its config again, so the key must outlive the page
  // (sessionStorage would not). What is kept is a 44-character string per order, and the
  // synchronous API lets the page store the key *before* it sends the public key, with no
  // window in which an order exists whose private key was not yet saved. IndexedDB's edge,
  // storing a non-extractable CryptoKey, does not apply: wg-quick needs the raw private key
  // written into the file, so the key must be extractable anyway. Both stores are equally
  // readable by script of this origin; the pages' Content-Security-Policy allows only this
  // site's own scripts.

  const ORDER_PREFIX = "molt.order-key.";
  const PENDING_PREFIX = "molt.pending-key.";

  function toBase64(bytes) {
    let binary = "";
    for (const byte of bytes) binary += String.fromCharCode(byte);
    return btoa(binary);
  }

  function keysSupported() {
    return Boolean(window.isSecureContext && window.crypto && window.crypto.subtle);
  }

  async function generateKeyPair() {
    if (!keysSupported()) {
      throw new Error("This page is not a secure context, so WebCrypto is unavailable: open MOLT over HTTPS (or localhost).");
    }
    let pair;
    try {
      pair = await crypto.subtle.generateKey({ name: "X25519" }, true, ["deriveBits"]);
    } catch (err) {
      throw new Error("This browser cannot make X25519 keys (WebCrypto X25519 is missing). Use a current Chrome, Firefox or Safari, or order through the API with `wg genkey`.");
    }
    const publicRaw = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
    const pkcs8 = new Uint8Array(await crypto.subtle.exportKey("pkcs8", pair.privateKey));
    // PKCS#8 of an X25519 key ends with the 32-byte private key: that is WireGuard's key.
    return { publicKey: toBase64(publicRaw), privateKey: toBase64(pkcs8.slice(-32)) };
  }

  function read(name) {
    try {
      const value = JSON.parse(localStorage.getItem(name) || "null");
      return value && value.publicKey && value.privateKey ? value : null;
    } catch (err) {
      return null;
    }
  }

  const keys = {
    supported: keysSupported,
    generate: generateKeyPair,
    // Before the request that sends the public key: kept under the public key itself.
    savePending(pair) {
      localStorage.setItem(PENDING_PREFIX + pair.publicKey, JSON.stringify({ ...pair, savedAt: Date.now() }));
    },
    dropPending(pair) {
      localStorage.removeItem(PENDING_PREFIX + pair.publicKey);
    },
    save(orderId, pair) {
      localStorage.setItem(ORDER_PREFIX + orderId, JSON.stringify({ ...pair, savedAt: Date.now() }));
      localStorage.removeItem(PENDING_PREFIX + pair.publicKey);
    },
    // The private key of `orderId` if this browser holds the one for `publicKey`. A pending
    // key whose request succeeded but whose answer was lost is adopted here.
    forOrder(orderId, publicKey) {
      const saved = read(ORDER_PREFIX + orderId);
      if (saved && saved.publicKey === publicKey) return saved;
      const pending = read(PENDING_PREFIX + publicKey);
      if (pending) {
        keys.save(orderId, pending);
        return pending;
      }
      return null;
    },
    forget(orderId) {
      localStorage.removeItem(ORDER_PREFIX + orderId);
    },
  };

  return { api, ApiError, iecBytes, keys, newIdempotencyKey, setStatus };
})();
