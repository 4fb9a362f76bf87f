// Keeps a litemultistep page up to date: while the tab is visible, fetch the same page again every
// few seconds and change only the elements that differ (rows are matched by their data-key), so an
// open traceback, a half-typed filter or the scroll position stay as they are. The server renders
// and escapes everything; this script only moves nodes the browser parsed as HTML, never builds
// markup from data.
(function () {
  "use strict";
  var every = parseInt(document.body.dataset.refresh, 10) || 1000;
  var timer = null;
  var busy = false;
  var failures = 0;

  function state(text, bad) {
    var el = document.querySelector("[data-live-state]");
    if (el) {
      el.textContent = text;
      el.classList.toggle("bad", !!bad);
    }
  }

  function keyOf(node, index) {
    if (node.nodeType === 1 && node.dataset && node.dataset.key) return "k" + node.dataset.key;
    return index + ":" + node.nodeName;
  }

  function syncAttributes(a, b) {
    var i, name;
    for (i = a.attributes.length - 1; i >= 0; i--) {
      name = a.attributes[i].name;
      if (!b.hasAttribute(name) && !(name === "open" && a.nodeName === "DETAILS")) a.removeAttribute(name);
    }
    for (i = 0; i < b.attributes.length; i++) {
      name = b.attributes[i].name;
      if (a.getAttribute(name) !== b.attributes[i].value) a.setAttribute(name, b.attributes[i].value);
    }
  }

  // Make `a` (in the page) look like `b` (freshly fetched); returns the node now in a's place.
  function morph(a, b) {
    if (a.nodeType !== b.nodeType || a.nodeName !== b.nodeName) {
      var fresh = document.importNode(b, true);
      a.replaceWith(fresh);
      return fresh;
    }
    if (a.nodeType !== 1) {
      if (a.nodeValue !== b.nodeValue) a.nodeValue = b.nodeValue;
      return a;
    }
    if (a.hasAttribute("data-live-state")) return a; // this script's own text
    if (a.isEqualNode(b)) return a;
    syncAttributes(a, b);
    morphChildren(a, b);
    return a;
  }

  function morphChildren(a, b) {
    var old = new Map();
    var i;
    for (i = 0; i < a.childNodes.length; i++) old.set(keyOf(a.childNodes[i], i), a.childNodes[i]);
    var wanted = Array.prototype.slice.call(b.childNodes);
    var previous = null;
    for (i = 0; i < wanted.length; i++) {
      var key = keyOf(wanted[i], i);
      var node = old.get(key);
      if (node) {
        old.delete(key);
        node = morph(node, wanted[i]);
      } else {
        node = document.importNode(wanted[i], true);
      }
      var at = previous ? previous.nextSibling : a.firstChild;
      if (at !== node) a.insertBefore(node, at);
      previous = node;
    }
    old.forEach(function (node) { node.remove(); });
  }

  function refresh() {
    timer = null;
    if (document.hidden || busy) return;
    busy = true;
    fetch(location.href, { headers: { "X-Live": "1" }, cache: "no-store", credentials: "same-origin" })
      .then(function (response) {
        return response.text().then(function (text) { return [response, text]; });
      })
      .then(function (pair) {
        var response = pair[0];
        var doc = new DOMParser().parseFromString(pair[1], "text/html");
        if (!doc.body || !doc.querySelector("main")) throw new Error("HTTP " + response.status);
        morph(document.body, doc.body);
        document.title = doc.title;
        failures = 0;
        // an answer that arrives once the tab is hidden must not undo the paused state
        state(document.hidden ? "Paused while this tab is hidden." :
              "Live: updated at " + new Date().toLocaleTimeString() + ", every " + every / 1000 +
              " s while this tab is visible.");
      })
      .catch(function (error) {
        failures += 1;
        state("Cannot reach the server (" + error.message + "); trying again.", true);
      })
      .then(function () {
        busy = false;
        schedule();
      });
  }

  function schedule() {
    if (timer !== null || document.hidden) return;
    // back off while the server does not answer, up to 30 s
    timer = setTimeout(refresh, Math.min(every * Math.pow(2, failures), 30000));
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) {
      if (timer !== null) clearTimeout(timer);
      timer = null;
      state("Paused while this tab is hidden.");
    } else {
      refresh();
    }
  });

  document.addEventListener("submit", function (event) {
    var message = event.target.dataset && event.target.dataset.confirm;
    if (message && !window.confirm(message)) event.preventDefault();
  });

  schedule();
})();
