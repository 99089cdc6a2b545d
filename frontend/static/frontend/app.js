// Small progressive enhancements; every page works without them.
(function () {
  "use strict";

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    // Plain http on a non-localhost host has no clipboard API: select and copy instead.
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } finally { document.body.removeChild(area); }
    return Promise.resolve();
  }

  // Live sections are morphed in place (hx-swap="outerMorph") so an open build log stays open and
  // keeps its scroll position while the section refreshes: whether a <details> is open is the
  // reader's choice, never the server's. A log scrolled to its end follows new lines.
  if (window.htmx && htmx.registerExtension) {
    var following = [];
    htmx.registerExtension("keep-reader-state", {
      htmx_before_morph_attr: function (elt, detail) {
        if (elt.tagName === "DETAILS" && detail && detail.attrName === "open") return false;
      },
      htmx_before_morph_node: function (elt) {
        if (elt.tagName === "PRE" && elt.scrollHeight > elt.clientHeight &&
            elt.scrollTop + elt.clientHeight >= elt.scrollHeight - 4) {
          following.push(elt);
        }
      },
      htmx_after_swap: function () {
        following.forEach(function (pre) { pre.scrollTop = pre.scrollHeight; });
        following = [];
      },
    });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy-target]");
    if (!button) return;
    var target = document.querySelector(button.getAttribute("data-copy-target"));
    if (!target) return;
    copyText(target.textContent.trim()).then(function () {
      var label = button.textContent;
      button.textContent = "Copied ✓";
      button.classList.add("btn-done");
      setTimeout(function () { button.textContent = label; button.classList.remove("btn-done"); }, 2000);
    });
  });

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
      return;
    }
    var busy = form.querySelector("[data-busy-text]");
    if (busy) {
      // Uploads can take a while: say so, and stop a second submission.
      setTimeout(function () {
        busy.disabled = true;
        busy.textContent = busy.getAttribute("data-busy-text");
      }, 0);
    }
  });
})();
