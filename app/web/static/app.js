// Latchkey UI: progressive enhancement only. Every page works as plain forms without this file.
// No inline script anywhere (the Content-Security-Policy forbids it): behaviour hangs off data-* attributes.
(function () {
  "use strict";

  function csrfToken() {
    var input = document.querySelector('input[name="csrf_token"]');
    return input ? input.value : "";
  }

  // Reveal: fetch the value only on an explicit click, show it, hide it again after N seconds.
  function setupReveal(box) {
    var valueEl = box.querySelector('[data-role="value"]');
    var revealBtn = box.querySelector('[data-role="reveal"]');
    var copyBtn = box.querySelector('[data-role="copy"]');
    var hideBtn = box.querySelector('[data-role="hide"]');
    var status = box.querySelector('[data-role="status"]');
    var masked = valueEl.textContent;
    var seconds = parseFloat(box.getAttribute("data-hide-seconds")) || 30;
    var timer = null;
    var value = null;

    function hide() {
      if (timer) { clearTimeout(timer); timer = null; }
      value = null;
      valueEl.textContent = masked;
      valueEl.classList.add("masked");
      box.removeAttribute("data-revealed");
      copyBtn.hidden = true;
      hideBtn.hidden = true;
      revealBtn.hidden = false;
      revealBtn.disabled = false;
    }

    revealBtn.addEventListener("click", function () {
      revealBtn.disabled = true;
      status.textContent = "Asking a worker for the value…";
      fetch(box.getAttribute("data-reveal-url"), {
        method: "POST",
        credentials: "same-origin",
        cache: "no-store",
        headers: { "X-CSRF-Token": csrfToken(), "Accept": "application/json" }
      }).then(function (resp) {
        return resp.json().then(function (body) { return { ok: resp.ok, body: body }; });
      }).then(function (res) {
        if (!res.ok) {
          status.textContent = "Not revealed: " + (res.body.detail || "the request was refused") + ".";
          revealBtn.disabled = false;
          return;
        }
        value = res.body.value;
        valueEl.textContent = value;
        valueEl.classList.remove("masked");
        box.setAttribute("data-revealed", "true");
        revealBtn.hidden = true;
        copyBtn.hidden = false;
        hideBtn.hidden = false;
        status.textContent = "Version " + res.body.version + ". Hidden again in " + seconds + " seconds.";
        timer = setTimeout(function () {
          hide();
          status.textContent = "Hidden again.";
        }, seconds * 1000);
      }).catch(function () {
        status.textContent = "Not revealed: the server could not be reached.";
        revealBtn.disabled = false;
      });
    });

    copyBtn.addEventListener("click", function () {
      if (value === null) { return; }
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(value).then(function () {
          status.textContent = "Copied to the clipboard.";
        }, function () {
          status.textContent = "Copy failed: select the value and copy it by hand.";
        });
      } else {
        status.textContent = "Copy is not available here: select the value and copy it by hand.";
      }
    });

    hideBtn.addEventListener("click", function () {
      hide();
      status.textContent = "Hidden.";
      revealBtn.focus();
    });
  }

  // Show only the inputs that belong to the chosen option (inputs of hidden blocks are disabled).
  function toggleBlocks(blocks, visible) {
    blocks.forEach(function (block) {
      var show = visible(block);
      block.hidden = !show;
      block.querySelectorAll("input, select, textarea").forEach(function (el) { el.disabled = !show; });
    });
  }

  function setupProviderForm(form) {
    var select = form.querySelector("[data-type-select]");
    var blocks = Array.prototype.slice.call(form.querySelectorAll("[data-show-for]"));
    function update() {
      toggleBlocks(blocks, function (b) {
        return b.getAttribute("data-show-for").split(" ").indexOf(select.value) !== -1;
      });
    }
    if (select && !select.disabled) {
      select.addEventListener("change", update);
      update();
    }
  }

  function setupSecretPicker(select) {
    var form = select.form;
    var block = form.querySelector("[data-new-secret]");
    if (!block) { return; }
    function update() {
      toggleBlocks([block], function () { return select.value === "__new__"; });
    }
    select.addEventListener("change", update);
    update();
  }

  // MCP credential headers: add a row from the <template>, remove a row; at most data-max rows.
  function setupHeaderEditor(box) {
    var rows = box.querySelector("[data-header-rows]");
    var template = box.querySelector("[data-header-template]");
    var add = box.querySelector("[data-header-add]");
    var max = parseInt(box.getAttribute("data-max"), 10) || 8;
    function count() { return rows.querySelectorAll("[data-header-row]").length; }
    function update() { add.disabled = count() >= max; }
    function nextIndex() {
      var next = 0;
      rows.querySelectorAll("[data-header-row] input[name$='-name']").forEach(function (input) {
        var n = parseInt(input.name.split("-")[1], 10);
        if (n >= next) { next = n + 1; }
      });
      return next;
    }
    rows.addEventListener("click", function (event) {
      var button = event.target.closest("[data-header-remove]");
      if (!button) { return; }
      button.closest("[data-header-row]").remove();
      update();
    });
    add.addEventListener("click", function () {
      if (count() >= max) { return; }
      var holder = document.createElement("div");
      holder.innerHTML = template.innerHTML.split("__i__").join(String(nextIndex()));
      var row = holder.firstElementChild;
      rows.appendChild(row);
      row.querySelector("input").focus();
      update();
    });
    add.hidden = false;
    update();
  }

  function setupToolPicker(select) {
    var groups = Array.prototype.slice.call(document.querySelectorAll("[data-server-tools]"));
    function update() {
      groups.forEach(function (g) {
        var chosen = g.getAttribute("data-server-tools") === select.value;
        var hasChecked = g.querySelector("input:checked") !== null;
        g.hidden = !(chosen || hasChecked);
      });
    }
    select.addEventListener("change", update);
    update();
  }

  // Polling: an element with data-poll is replaced by a fresh copy of itself until the copy stops asking.
  function poll(el) {
    var url = el.getAttribute("data-poll");
    var interval = parseInt(el.getAttribute("data-poll-interval"), 10) || 1000;
    setTimeout(function () {
      if (!document.body.contains(el)) { return; }
      fetch(url, { credentials: "same-origin", cache: "no-store", headers: { "Accept": "text/html" } })
        .then(function (resp) {
          if (!resp.ok) { throw new Error("status " + resp.status); }
          return resp.text();
        })
        .then(function (html) {
          var tpl = document.createElement("template");
          tpl.innerHTML = html.trim();
          var fresh = tpl.content.firstElementChild;
          if (!fresh) { return; }
          el.replaceWith(fresh);
          if (fresh.hasAttribute("data-poll")) { poll(fresh); }
        })
        .catch(function () { poll(el); });
    }, interval);
  }

  function confirmForms() {
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) { event.preventDefault(); }
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-reveal-url]").forEach(setupReveal);
    document.querySelectorAll("[data-provider-form]").forEach(setupProviderForm);
    document.querySelectorAll("[data-secret-picker]").forEach(setupSecretPicker);
    document.querySelectorAll("[data-header-editor]").forEach(setupHeaderEditor);
    document.querySelectorAll("[data-server-select]").forEach(setupToolPicker);
    document.querySelectorAll("[data-poll]").forEach(poll);
    confirmForms();
  });
})();
