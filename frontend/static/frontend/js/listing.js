/* Listing page: re-price as hours and GPUs change, and order with a key pair made here.
 * Amounts are compared as the API's integers and shown as the server spells them (the quote's
 * `display`, the wallet's text): money is formatted in one place, marketplace/money.py. */
"use strict";

(function () {
  const form = document.getElementById("quote-form");
  if (!form) return;
  const hours = document.getElementById("id_hours");
  const gpus = document.getElementById("id_gpu_count");
  const quoteBox = document.getElementById("quote");
  const quoteStatus = document.getElementById("quote-status");
  const button = document.getElementById("order-button");
  const orderStatus = document.getElementById("order-status");
  const wallet = document.getElementById("wallet-available");
  const cells = {
    time: document.getElementById("quote-time"),
    allowance: document.getElementById("quote-allowance"),
    fee: document.getElementById("quote-fee"),
    total: document.getElementById("quote-total"),
  };
  let quote = null; // the last valid quote (while `refreshing`, for the inputs before the edit)
  let sequence = 0; // answers to older requests are ignored
  let timer = null; // a re-price waiting for the typing to pause
  let refreshing = null; // the re-price in flight, awaited by an order placed meanwhile
  let attempt = null; // an order request whose answer never came: retried as is
  let busy = false;

  function parsedInputs() {
    const h = Number(hours.value);
    const g = Number(gpus.value);
    if (!Number.isInteger(h) || !Number.isInteger(g)) return null;
    return { hours: h, gpu_count: g };
  }

  let fundsShown = false; // the "not enough credits" message is on screen

  function updateButton() {
    if (!button) return;
    const available = wallet ? Number(wallet.dataset.amount) : 0;
    const short = Boolean(quote) && quote.total_hold > available;
    const taken = Boolean(quote) && quote.gpu_count > quote.gpus_available;
    button.disabled = busy || !quote || short || taken || !Molt.keys.supported();
    if (attempt) button.textContent = "Try again";
    else button.textContent = quote ? `Order for ${quote.display.total_hold}` : "Order";
    if (busy) return;
    if (taken) {
      Molt.setStatus(orderStatus, `Only ${quote.gpus_available} GPU(s) of this listing are free right now.`, "error");
    } else if (short) {
      Molt.setStatus(orderStatus, `Not enough credits: the hold is ${quote.display.total_hold} and you have ${wallet.textContent.trim()} available.`, "error");
    } else if (fundsShown) {
      Molt.setStatus(orderStatus, "");
    }
    fundsShown = short || taken;
  }

  function requote() {
    clearTimeout(timer);
    timer = null;
    refreshing = fetchQuote();
    return refreshing;
  }

  // The old quote stays while a new one is fetched: clearing it would disable the Order button
  // under a keyboard user who has just tabbed onto it (focus falls to <body> and Enter does
  // nothing). An order placed meanwhile waits for the new price (order() awaits `refreshing`).
  async function fetchQuote() {
    const inputs = parsedInputs();
    attempt = null;
    if (!inputs) {
      quote = null;
      Molt.setStatus(quoteStatus, "Enter whole numbers of hours and GPUs.", "error");
      updateButton();
      return;
    }
    const mine = ++sequence;
    quoteBox.setAttribute("aria-busy", "true");
    quoteBox.classList.add("stale");
    Molt.setStatus(quoteStatus, "Updating the price…", "busy");
    updateButton();
    const url = `${form.dataset.quoteUrl}?hours=${inputs.hours}&gpu_count=${inputs.gpu_count}`;
    try {
      const data = await Molt.api("GET", url);
      if (mine !== sequence) return;
      quote = data;
      cells.time.textContent = data.display.time_charge;
      cells.allowance.textContent = data.display.bandwidth_allowance_charge;
      cells.fee.textContent = data.display.fee;
      cells.total.textContent = data.display.total_hold;
      Molt.setStatus(quoteStatus, "");
    } catch (err) {
      if (mine !== sequence) return;
      quote = null;
      cells.total.textContent = "—";
      Molt.setStatus(quoteStatus, err.message, "error");
    } finally {
      if (mine === sequence) {
        quoteBox.setAttribute("aria-busy", "false");
        quoteBox.classList.remove("stale");
        updateButton();
      }
    }
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(requote, 250);
  }

  form.addEventListener("input", schedule);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    requote();
  });

  async function order() {
    if (busy) return;
    busy = true;
    updateButton();
    // The price shown may be for inputs just edited: order at the price of what is typed now.
    if (timer) requote();
    if (refreshing) await refreshing;
    const available = wallet ? Number(wallet.dataset.amount) : 0;
    if (!quote || quote.total_hold > available || quote.gpu_count > quote.gpus_available) {
      busy = false;
      updateButton();
      return;
    }
    try {
      if (!attempt) {
        Molt.setStatus(orderStatus, "Making your WireGuard key pair in this browser…", "busy");
        const pair = await Molt.keys.generate();
        // Saved before the request: if the answer is lost, the order page adopts this key.
        Molt.keys.savePending(pair);
        attempt = {
          pair,
          idempotencyKey: Molt.newIdempotencyKey(),
          body: {
            listing: Number(button.dataset.listingId),
            gpu_count: quote.gpu_count,
            hours: quote.hours,
            wireguard_public_key: pair.publicKey, // the public key only
          },
        };
        const image = document.getElementById("order-image");
        if (image && image.value) attempt.body.image = image.value;
      }
      Molt.setStatus(orderStatus, "Placing the order and holding the price on your wallet…", "busy");
      const created = await Molt.api("POST", button.dataset.ordersUrl, {
        body: attempt.body,
        idempotencyKey: attempt.idempotencyKey,
      });
      Molt.keys.save(created.id, attempt.pair);
      Molt.setStatus(orderStatus, `Order #${created.id} placed. Opening it…`, "ok");
      window.location.assign(`${button.dataset.orderPage}${created.id}/`);
    } catch (err) {
      if (err instanceof Molt.ApiError && err.network) {
        // Same key, same body: the server answers a retry with the first result.
        Molt.setStatus(orderStatus, `${err.message} Nothing is charged twice when you try again.`, "error");
      } else {
        if (attempt) Molt.keys.dropPending(attempt.pair);
        attempt = null;
        Molt.setStatus(orderStatus, err.message, "error");
      }
      busy = false;
      updateButton();
    }
  }

  if (button) {
    if (!Molt.keys.supported()) {
      document.getElementById("webcrypto-missing").hidden = false;
    }
    button.addEventListener("click", order);
  }
  requote();
})();
